#!/usr/bin/env bash
# The man pages cannot rot silently: each renders without a groff warning,
# `man -l` shows it, it names every option its program's --help lists, and it
# carries the program's version.
# Usage: check_man.sh CBWFS_BINARY CBWCTL_BINARY MAN_DIR
set -euo pipefail
cbwfs=$1 cbwctl=$2 mandir=$3
fail=0
check() {  # PROGRAM PAGE
  local prog=$1 page=$2 warnings text opts version
  warnings=$(groff -man -Tutf8 -ww -z "$page" 2>&1 >/dev/null)
  if [ -n "$warnings" ]; then
    echo "FAIL: $page: groff warnings:" >&2; echo "$warnings" >&2; fail=1
  fi
  if ! MANWIDTH=80 man -P cat -l "$page" >/dev/null 2>&1; then
    echo "FAIL: $page: man -l cannot show it" >&2; fail=1
  fi
  # The source with roff's escaped dashes made plain.
  text=$(sed 's/\\-/-/g; s/\\f[BIRP]//g' "$page")
  opts=$("$prog" --help | grep -oE '(^|[ ,\[])--?[a-zA-Z][a-zA-Z-]*' | grep -oE -- '--?[a-zA-Z][a-zA-Z-]*' | sort -u)
  [ -n "$opts" ] || { echo "FAIL: no options found in $prog --help" >&2; fail=1; }
  for o in $opts; do
    if ! grep -qE -- "(^|[^a-zA-Z-])${o}([^a-zA-Z-]|\$)" <<<"$text"; then
      echo "FAIL: $page does not document $o (from $(basename "$prog") --help)" >&2; fail=1
    fi
  done
  version=$("$prog" --version | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1)
  if ! grep -q "^\.TH .*cbwfs $version" "$page"; then
    echo "FAIL: $page: .TH does not say version $version" >&2; fail=1
  fi
  echo "checked $page: $(wc -w <<<"$opts") options"
}
command -v groff >/dev/null || { echo "SKIP: groff not installed" >&2; exit 77; }
check "$cbwfs" "$mandir/cbwfs.1"
check "$cbwctl" "$mandir/cbwctl.1"
exit $fail
