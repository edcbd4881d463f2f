#!/usr/bin/env bash
# The SMTP server the alert email test sends to (crates/lockstep-cli/tests/alerts.rs):
# Debian's python3-aiosmtpd, installed when missing. Without it that test skips and says so.
set -euo pipefail
if /usr/bin/python3 -c "import aiosmtpd" 2>/dev/null; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
if command -v apt-get >/dev/null; then
  echo "== installing python3-aiosmtpd (alert email test)"
  $SUDO apt-get install -y -q python3-aiosmtpd >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q python3-aiosmtpd >/dev/null; } ||
    echo "warning: could not install python3-aiosmtpd; the alert email test will skip" >&2
else
  echo "warning: no apt-get; the alert email test will skip without python3-aiosmtpd" >&2
fi
