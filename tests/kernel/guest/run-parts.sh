#!/bin/sh
# Runs the guest parts named on the command line as NAME:SCRIPT (/klab/SCRIPT.sh), one after
# the other, each with its own result folder /out/NAME (log, rc, seconds), so that one boot
# serves several tests and a failing or hanging part (killed after $PART_TIMEOUT s) does not
# hide the others. A part's arguments come from $ARGS_<NAME>.
for spec in "$@"; do
    name=${spec%%:*} script=${spec#*:}
    mkdir -p "/out/$name"
    eval "args=\${ARGS_$name:-}"
    t0=$(/usr/bin/date +%s%N)
    # shellcheck disable=SC2086 # the argument list is split on purpose
    timeout "${PART_TIMEOUT:-180}" sh "/klab/$script.sh" "/out/$name" $args >"/out/$name/log" 2>&1
    rc=$?
    t1=$(/usr/bin/date +%s%N)
    echo "$rc" >"/out/$name/rc"
    echo "=== part $name: rc=$rc in $(((t1 - t0) / 1000000)) ms"
    cat "/out/$name/log"
done
