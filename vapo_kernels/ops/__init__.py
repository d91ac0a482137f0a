"""One module per op family: reference, torch op, fake kernel and backend hooks."""
