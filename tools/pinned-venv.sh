# Sourced by the scripts that run Python references: `pinned_venv VENV REQUIREMENTS` creates the
# virtual environment VENV (git-ignored under tools/) on first use and keeps it in sync with the
# pinned REQUIREMENTS file (a SHA-256 stamp inside it); safe to call at any time.
pinned_venv() {
    local venv="$1" req="$2" want
    if [ ! -x "$venv/bin/python" ]; then
        echo "creating $venv" >&2
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    if [ "$want" != "$(cat "$venv/.requirements.sha256" 2>/dev/null || true)" ]; then
        echo "installing $req into $venv (torch is large; this takes a few minutes)" >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
        echo "$want" > "$venv/.requirements.sha256"
    fi
}
