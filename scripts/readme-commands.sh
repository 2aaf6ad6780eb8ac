#!/usr/bin/env bash
# Runs the README's quick commands, so that the README cannot drift from the code: every ```sh block that
# follows a line `<!-- quick -->` in README.md, as written, in order, in one bash shell (an `export` carries
# over to the next block), from the repository root, stopping at the first command that fails.
#
# Usage: scripts/readme-commands.sh           run them (CI: .ci/run, after `cargo test --workspace`)
#        scripts/readme-commands.sh --list    print them only
#
# The README's own set-up commands (`cargo run --release -- train`, `cargo test --workspace`) are not marked
# quick: they are expected to have run. Where there is no input.txt (the text file the README's `strata
# prepare` reads), this writes one from README.md, as the README suggests. Files and directories the commands
# create in the repository root (input.txt, data/, metrics.jsonl) are removed at the end; ones that were there
# before are left (and may be overwritten, as the README's commands would).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# The quick blocks' lines; fails on a marker without a ```sh block after it, an unterminated block, a line
# continued with a backslash (each line runs as one command), or no quick block at all.
quick_lines() {
    awk '
        function fail(msg) { printf "README.md:%d: %s\n", NR, msg > "/dev/stderr"; failed = 1; exit 1 }
        state == 0 && /^<!-- quick -->[ \t]*$/ { state = 1; next }
        state == 1 { if ($0 != "```sh") fail("<!-- quick --> must be followed by a ```sh block"); state = 2; blocks++; next }
        state == 2 && /^```[ \t]*$/ { state = 0; next }
        state == 2 && /\\[ \t]*$/ { fail("a quick command continues on the next line; write it on one line") }
        state == 2 { print; next }
        END {
            if (failed) exit 1
            if (state != 0) { print "README.md: a quick block is not closed" > "/dev/stderr"; exit 1 }
            if (blocks == 0) { print "README.md: no <!-- quick --> blocks found" > "/dev/stderr"; exit 1 }
        }
    ' README.md
}

lines="$(quick_lines)"
if [ "${1:-}" = "--list" ]; then
    printf '%s\n' "$lines"
    exit 0
fi

# Untracked entries at the top of the repository (files, or whole directories), before and after: only what the
# commands created is removed.
untracked() {
    git ls-files --others --directory 2>/dev/null | grep -E '^[^/]+/?$' | grep -v -e '^target/$' -e '^\.venv' || true
}
before="$(untracked)"
made_input=0
script=""
cleanup() {
    local after path
    after="$(untracked)"
    while IFS= read -r path; do
        [ -n "$path" ] || continue
        if ! grep -qxF -- "$path" <<<"$before"; then
            rm -rf -- "$path"
        fi
    done <<<"$after"
    if [ "$made_input" = 1 ]; then
        rm -f input.txt
    fi
    if [ -n "$script" ]; then
        rm -f "$script"
    fi
}
trap cleanup EXIT
if [ ! -e input.txt ]; then
    cp README.md input.txt
    made_input=1
fi

# One script: each command echoed, run as written, and timed.
script="$(mktemp)"
{
    echo 'set -euo pipefail'
    echo 'readme_started=$SECONDS'
    while IFS= read -r line; do
        # Blank lines and comment lines are not commands.
        if [[ -z "${line//[[:space:]]/}" || "$line" =~ ^[[:space:]]*# ]]; then
            continue
        fi
        printf 'printf "\\n\\$ %%s\\n" %q\n' "$line"
        echo 'readme_t=$SECONDS'
        printf '%s\n' "$line"
        echo 'printf "  (%ss)\n" $((SECONDS - readme_t))'
    done <<<"$lines"
    echo 'printf "\nREADME quick commands: all passed in %ss\n" $((SECONDS - readme_started))'
} >"$script"
bash "$script"
