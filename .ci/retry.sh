# Sourced by .ci/run and .ci/install_peers.sh.
# `retry CMD...` runs CMD up to 4 times, waiting 30, 90, then 180 s between tries. CI
# installs from PyPI, and one run (stop 26) failed after 34 s on a dropped connection
# while downloading triton (pip's own resume gave up after six tries within seconds);
# the network came back for the next run, so waiting and trying again is the fix.
retry() {
    local attempt=1 waits=(30 90 180)
    until "$@"; do
        if ((attempt > ${#waits[@]})); then
            echo "retry: giving up after $attempt tries: $*" >&2
            return 1
        fi
        echo "retry: try $attempt failed; trying again in ${waits[attempt - 1]} s: $*" >&2
        sleep "${waits[attempt - 1]}"
        attempt=$((attempt + 1))
    done
}
