"""``vapo-diagnose``: studies of VAPO's credit assignment built on ``vapo-train``.

One module per study (:mod:`.injected_errors`, :mod:`.value_probe`, :mod:`.short_vs_long`,
:mod:`.ablations`), shared pieces in :mod:`.common`, the command in :mod:`.cli`.
"""
