#!/usr/bin/env bash
# The system (Debian / Ubuntu) packages the test suite uses, installed when missing:
#   espeak-ng                           speech for the demo's audio data and the spoken-digit tests
#   fonts-dejavu-core, fonts-liberation the demo's text-in-image data
#   chromium + chromium-driver          headless browser for the web page's tests (Selenium)
# As root it runs apt-get; otherwise it prints the one command to run and exits 1. `--check` only reports.
# Nothing here is needed by `make serve`.
set -euo pipefail

missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
[ -d /usr/share/fonts/truetype/dejavu ] || missing+=(fonts-dejavu-core)
[ -d /usr/share/fonts/truetype/liberation ] || missing+=(fonts-liberation)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    missing+=(chromium)
fi
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0

# Ubuntu ships the browser and its driver under other names
if [ -r /etc/os-release ] && grep -qi '^ID=ubuntu' /etc/os-release; then
    for i in "${!missing[@]}"; do
        case "${missing[$i]}" in
            chromium) missing[$i]=chromium-browser ;;
            chromium-driver) missing[$i]=chromium-chromedriver ;;
        esac
    done
fi
cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [ "${1:-}" = "--check" ]; then
    echo "missing system packages: ${missing[*]}"
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "make test: these system packages are missing and this machine has no apt-get: ${missing[*]}" >&2
    echo "  (espeak-ng, the DejaVu and Liberation fonts, Chromium and its chromedriver): install them, then re-run" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "make test: system packages are missing: ${missing[*]}. Install them once with:" >&2
    echo "  sudo sh -c '$cmd'" >&2
    exit 1
fi
echo "[setup] apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
