#!/usr/bin/env bash
# The GPU check (docs/gpu-check.md): every CUDA path tested and measured in one command.
#
#   benchmarks/gpu_check.sh OUTDIR [--wheels DIR] [--device cuda|cpu] [--quick] [--budget-s 540] [--overwrite] ...
#
# Uses the machine's own Python and torch ($PYTHON, else .venv/bin/python, else python3; it never
# installs torch). When DIR (default .stage/pieces, made by benchmarks/stage_wheels.sh) holds every piece
# listed in its SHA256SUMS, the pieces are checked, reassembled and installed with pip --no-index into
# a private folder ($GQ_DALI_SITE, default /tmp/gq-dali-site) that is put on PYTHONPATH for the check
# alone; otherwise the check runs without DALI and reports its rows as skipped. The project is used
# in place, under its import name (a folder gq/ of links to the repository's folders, as setup.cfg maps
# them). The options after OUTDIR are benchmarks/gpu_check.py's (see --help).
set -euo pipefail
t0=$(date +%s.%N)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
help=
# The project in place under its import name, without installing it: $ns/gq/<package> -> <repo>/<folder>.
ns=${TMPDIR:-/tmp}/gq-in-place.$$
trap 'rm -rf "$ns"' EXIT
mkdir -p "$ns/gq"
while read -r name folder; do ln -s "$repo/$folder" "$ns/gq/${name#gq.}"; done < <(
    awk '/^package_dir/ {on = 1; next} on && /^ +gq\./ {print $1, $3; next} on && !/^ / {on = 0}' "$repo/setup.cfg")
if [[ -n ${PYTHON:-} ]]; then py=$PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then py=$repo/.venv/bin/python
else py=python3
fi
wheels=$repo/.stage/pieces
site=${GQ_DALI_SITE:-${TMPDIR:-/tmp}/gq-dali-site}
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) wheels=${2:?--wheels needs a directory}; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; echo
                   help=1; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

# Install the staged DALI wheels; sets `note` (what happened) and `dali_site` (empty when not installed).
install_dali() {
    local sums=$wheels/SHA256SUMS pieces=() missing=() expect tmp p
    dali_site=
    if [[ ! -f $sums ]]; then note="none staged ($sums is missing)"; return 0; fi
    mapfile -t pieces < <(awk '$2 != "dali-wheels.tar" {print $2}' "$sums")
    for p in "${pieces[@]}"; do [[ -f $wheels/$p ]] || missing+=("$p"); done
    if (( ${#missing[@]} )); then
        note="not installed: $(( ${#pieces[@]} - ${#missing[@]} )) of ${#pieces[@]} pieces in $wheels"
        note+=" (missing ${missing[*]})"
        return 0
    fi
    expect=$(awk '$2 == "dali-wheels.tar" {print $1}' "$sums")
    if [[ -f $site/.installed && $(cat "$site/.installed") == "$expect" ]]; then
        dali_site=$site note="already installed in $site (tar $expect)"; return 0
    fi
    if ! (cd "$wheels" && awk '$2 != "dali-wheels.tar"' SHA256SUMS | sha256sum --check --quiet); then
        note="not installed: a piece in $wheels fails its SHA256SUMS line; stage and copy it again"; return 0
    fi
    tmp=$(mktemp -d)
    (cd "$wheels" && cat "${pieces[@]}") >"$tmp/dali-wheels.tar"
    if [[ $(sha256sum "$tmp/dali-wheels.tar" | cut -d' ' -f1) != "$expect" ]]; then
        rm -rf "$tmp"; note="not installed: the reassembled tar does not match SHA256SUMS"; return 0
    fi
    mkdir "$tmp/whl" && tar -xf "$tmp/dali-wheels.tar" -C "$tmp/whl"
    rm -rf "$site"
    if ! "$py" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
            --target "$site" "$tmp"/whl/*.whl >"$tmp/pip.log" 2>&1; then
        note="not installed: pip install --target $site failed: $(tail -n 1 "$tmp/pip.log")"
        rm -rf "$tmp" "$site"; return 0
    fi
    echo "$expect" >"$site/.installed"
    rm -rf "$tmp"
    dali_site=$site note="installed from ${#pieces[@]} pieces into $site (tar $expect)"
}

# DALI's GPU numpy reader dlopens libcufile.so(.0) through its RUNPATH (../cu13/lib beside DALI, which a
# private folder lacks) or the loader path; the image's CUDA packages hold it elsewhere, so link the first
# one found into $site/lib and put that on LD_LIBRARY_PATH for the check.
link_cufile() {
    local found
    found=$("$py" -c 'import glob, sys
hits = [p for d in sys.path if d for p in sorted(glob.glob(d + "/nvidia/**/libcufile.so*", recursive=True))]
hits += sorted(glob.glob("/usr/local/cuda*/lib64/libcufile.so*"))
print(hits[0] if hits else "")')
    if [[ -z $found ]]; then note+="; no libcufile found (DALI's GPU reader may fail)"; return 0; fi
    mkdir -p "$site/lib"
    ln -sf "$found" "$site/lib/libcufile.so"
    ln -sf "$found" "$site/lib/libcufile.so.0"
    export LD_LIBRARY_PATH="$site/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    note+="; libcufile: $found"
}

if [[ -n $help ]]; then PYTHONPATH="$ns" "$py" "$repo/benchmarks/gpu_check.py" --help; exit; fi
install_dali
if [[ -n $dali_site ]]; then link_cufile; fi
echo "gpu_check.sh: DALI wheels: $note ($(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN {printf "%.0f", a - b}') s)"
export PYTHONPATH="$ns${dali_site:+:$dali_site}${PYTHONPATH:+:$PYTHONPATH}"
"$py" "$repo/benchmarks/gpu_check.py" "${args[@]}" --dali-install "$note" --t0 "$t0"
