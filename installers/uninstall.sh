#!/usr/bin/env bash
# Remove Hearth installed by install.sh: stops and removes the service and /opt/hearth.
# Configuration (/etc/hearth) and models (/var/lib/hearth) stay unless --purge.
set -euo pipefail

PREFIX="" PURGE=no SERVICE_USER=hearth
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$(realpath -m "${2:?--prefix needs a directory}"); shift 2 ;;
        --user) SERVICE_USER=${2:?--user needs a name}; shift 2 ;;
        --purge) PURGE=yes; shift ;;
        -h | --help) echo "usage: uninstall.sh [--prefix DIR] [--user NAME] [--purge]"; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1" >&2; exit 1 ;;
    esac
done

say() { printf '==> %s\n' "$*"; }
UNIT=$PREFIX/etc/systemd/system/hearth.service
if [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl disable --now --quiet hearth.service 2>/dev/null || true
fi
rm -f "$UNIT"
if [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
fi
rm -rf "$PREFIX/opt/hearth"
say "removed the service and $PREFIX/opt/hearth"
if [ "$PURGE" = yes ]; then
    rm -rf "$PREFIX/etc/hearth" "$PREFIX/var/lib/hearth"
    if [ -z "$PREFIX" ] && id "$SERVICE_USER" >/dev/null 2>&1; then
        userdel "$SERVICE_USER"
    fi
    say "purged configuration, models and the $SERVICE_USER user"
else
    say "kept $PREFIX/etc/hearth and $PREFIX/var/lib/hearth (pass --purge to delete them)"
fi
