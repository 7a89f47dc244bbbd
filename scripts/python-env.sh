# shellcheck shell=bash
# Sourced by scripts/dev-up, scripts/test and scripts/services-up: messages, apt-get, and the
# Python environment the project runs in.
#
# Which Python: $IMAGE_PYTHON if set; else an active virtualenv ($VIRTUAL_ENV); else ./.venv,
# created with `python3 -m venv` when possible (on Debian's own python3 that needs the
# python3-venv package, installed here when running as root); else python3 itself (a pyenv or
# other user-owned Python that pip may install into).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$REPO_ROOT/run"

say() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

APT_UPDATED=0
# apt_install PACKAGE...: install Debian packages when root, else say exactly what to run.
apt_install() {
    if ! is_root || ! command -v apt-get >/dev/null 2>&1; then
        die "missing: $*. Install with: sudo apt-get install -y $*  (then run this again)"
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" </dev/null ||
        die "apt-get install $* failed"
}

# python_ok PYTHON: is it Python >= 3.11?
python_ok() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

# select_python: sets PY to the interpreter the project is installed in and run with.
select_python() {
    if [ -n "${IMAGE_PYTHON:-}" ]; then
        PY="$IMAGE_PYTHON"
    elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        PY="$VIRTUAL_ENV/bin/python"
    elif [ -x "$REPO_ROOT/.venv/bin/python" ] && python_ok "$REPO_ROOT/.venv/bin/python"; then
        PY="$REPO_ROOT/.venv/bin/python"
    else
        local host
        host="$(command -v python3 || true)"
        if [ -z "$host" ]; then
            apt_install python3 python3-venv
            host="$(command -v python3)"
        fi
        python_ok "$host" || die "$host is older than Python 3.11; install Python 3.11 or newer"
        rm -rf "$REPO_ROOT/.venv"
        if ! "$host" -m venv "$REPO_ROOT/.venv" >/dev/null 2>&1; then
            rm -rf "$REPO_ROOT/.venv"
            if [ "$host" = /usr/bin/python3 ] && is_root && command -v apt-get >/dev/null; then
                local minor
                minor="$("$host" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
                apt_install python3-venv "python${minor}-venv"
                "$host" -m venv "$REPO_ROOT/.venv" || die "python3 -m venv failed"
            fi
        fi
        if [ -x "$REPO_ROOT/.venv/bin/python" ]; then
            say "created .venv with $host"
            PY="$REPO_ROOT/.venv/bin/python"
        elif [ "$host" = /usr/bin/python3 ]; then
            die "cannot create a virtualenv: install it with: sudo apt-get install -y python3-venv"
        else
            warn "cannot create .venv with $host; installing into $host itself"
            PY="$host"
        fi
    fi
    python_ok "$PY" || die "$PY is not a working Python 3.11+"
    # Where its console scripts (image-service, backup-agent, image-cli) are installed.
    # shellcheck disable=SC2034  # used by the scripts that source this file
    PY_SCRIPTS="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
}

# ensure_package: `pip install -e '.[test]'` unless this checkout is already installed in $PY
# with the test tools and pyproject.toml has not changed since.
ensure_package() {
    local stamp want have where
    mkdir -p "$RUN_DIR"
    stamp="$RUN_DIR/installed.stamp"
    want="$PY $(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
    have="$(cat "$stamp" 2>/dev/null || true)"
    # Imported from outside the checkout, so an editable install of another clone shows up.
    # shellcheck disable=SC2015  # `|| true`: a failed import just means "not installed"
    where="$(cd / && "$PY" -c '
import image_service, backup_agent, pytest, pytest_asyncio, pytest_timeout, hypothesis, mypy
import prometheus_client, httpx, zstack_mcp.zstack_client
import os; print(os.path.dirname(os.path.dirname(os.path.realpath(image_service.__file__))))
' 2>/dev/null || true)"
    if [ "$want" = "$have" ] && [ "$where" = "$(realpath "$REPO_ROOT")" ] &&
        "$PY" -m ruff --version >/dev/null 2>&1; then
        return 0
    fi
    say "pip install -e '.[test]' into $PY (log: run/pip-install.log)"
    if ! "$PY" -m pip install --disable-pip-version-check -e "${REPO_ROOT}[test]" \
        </dev/null >"$RUN_DIR/pip-install.log" 2>&1; then
        tail -n 30 "$RUN_DIR/pip-install.log" >&2
        die "pip install -e '.[test]' failed (see run/pip-install.log)"
    fi
    # ZStack's portal client for the portal tests: the package's own dependencies (mcp) are
    # not needed by its client module, and mcp 2.x breaks the package's server module anyway.
    if ! "$PY" -m pip install --disable-pip-version-check --no-deps 'zstack-mcp-server==0.1.7' \
        </dev/null >>"$RUN_DIR/pip-install.log" 2>&1; then
        tail -n 30 "$RUN_DIR/pip-install.log" >&2
        die "pip install --no-deps zstack-mcp-server failed (see run/pip-install.log)"
    fi
    echo "$want" >"$stamp"
}
