#!/bin/sh
# First command inside a virtme-ng guest (see tools/vm_matrix.py).
# usage: guest.sh PYTHON OUT_DIR BIND_DIR... -- GUEST_PY_ARGS...
#
# The guest's root is the host's, shared over 9p without a page cache: every Python
# import reads it again (and under emulation that costs minutes). The host root is
# exported a second time (virtme-ng --rodir=/mnt=/); remount it with cache=loose and
# bind the Python prefixes and the checkout's code from it, so files are read once.
set -u
# tools/vm_matrix.py: a kernel crash before this line is the boot's, not a test's
echo "guest.sh: started"
python=$1 out=$2
shift 2
# the 9p tag of the --rodir mounted on /mnt (virtme_initmountN=/mnt on the command line)
tag=$(tr ' ' '\n' </proc/cmdline | sed -n 's|^virtme_initmount\([0-9]*\)=/mnt$|virtme.initmount\1|p')
if [ -n "$tag" ] && umount /mnt 2>/dev/null &&
   mount -t 9p -o ro,version=9p2000.L,trans=virtio,access=any,msize=524288,cache=loose \
       "$tag" /mnt; then
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        [ -d "/mnt$1" ] && mount --bind "/mnt$1" "$1"
        shift
    done
else
    echo "guest.sh: no cached mount of the host root: running from the uncached root" >&2
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do shift; done
fi
[ "${1:-}" = "--" ] && shift
mkdir -p /tmp/ei-vm && export TMPDIR=/tmp/ei-vm
exec "$python" "$(dirname "$0")/guest.py" --out "$out" "$@"
