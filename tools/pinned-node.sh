# Sourced by the scripts that run npm references: `pinned_node DIR` installs DIR's npm packages
# into DIR/node_modules (git-ignored) on first use, exactly as DIR/package-lock.json pins them
# (`npm ci`, install scripts off: nothing is fetched from outside the npm registry), and again
# whenever the lock changes (a SHA-256 stamp inside node_modules); safe to call at any time.
pinned_node() {
    local dir="$1" want
    want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
    if [ "$want" != "$(cat "$dir/node_modules/.package-lock.sha256" 2>/dev/null || true)" ]; then
        echo "installing $dir/package-lock.json into $dir/node_modules (about 420 MB)" >&2
        (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) >&2
        echo "$want" > "$dir/node_modules/.package-lock.sha256"
    fi
}
