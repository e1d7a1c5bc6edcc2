#!/usr/bin/env bash
# Stage DALI for a GPU machine that cannot reach a package registry.
#
# Downloads the DALI wheel for CUDA 13 and the dependencies a CUDA image with torch typically lacks,
# for CPython 3.12 manylinux x86_64, packs them into one tar (same bytes on every run) and splits it into pieces of
# at most 60 MiB (--piece-mib), so that each piece fits a transfer with a size limit. The GPU check
# (benchmarks/gpu_check.sh --wheels DIR) reassembles the pieces and installs them into a private folder.
#
#   benchmarks/stage_wheels.sh [--out DIR] [--piece-mib N] [--python-version 3.12] [--python PY]
#
# --python-version picks the CPython the binary wheels are for [default: 3.12]; --python
# is the interpreter whose pip downloads them.
#
# Output (DIR defaults to .stage, which git ignores):
#   DIR/wheels/*.whl                    the downloaded wheels
#   DIR/pieces/dali-wheels.tar.NN       the pieces, NN = 00, 01, ...
#   DIR/pieces/SHA256SUMS               checksums of every piece and of the whole tar
set -euo pipefail

# DALI's own pin (setup.cfg: nvidia-dali >= 2.4) in its CUDA 13 build, to match a torch built for CUDA 13
# (cu130), plus DALI's requirements that such an image typically lacks (numpy, packaging, six, pyyaml and
# typing-extensions are there). The codec packages DALI names (nvimgcodec, nvcomp) are left out: the
# numpy reader does not use them and DALI loads them only on demand.
PACKAGES=(nvidia-dali-cuda130==2.4.0 astunparse==1.6.3 gast==0.7.0 libcst==1.9.0 makefun==1.16.0
          nvtx==0.2.17 optree==0.20.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

out=.stage
piece_mib=60
pyver=3.12
python=${PYTHON:-python3}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --piece-mib) piece_mib=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --python-version) pyver=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "stage_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ $piece_mib =~ ^[0-9]+$ ]] || (( piece_mib < 1 )); then
    echo "stage_wheels.sh: --piece-mib $piece_mib: must be a whole number of MiB, at least 1" >&2
    exit 2
fi

platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
mkdir -p "$out/wheels"
echo "stage_wheels: downloading ${#PACKAGES[@]} wheels for CPython $pyver manylinux x86_64 into $out/wheels"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platform_args[@]}" -d "$out/wheels" "${PACKAGES[@]}"

# Keep exactly the pinned wheels (an earlier run with other pins may have left others behind).
wanted=()
for spec in "${PACKAGES[@]}"; do
    name=${spec%%==*}; version=${spec#*==}
    match=("$out"/wheels/"${name//-/_}"-"$version"-*.whl)
    if [[ ! -f ${match[0]} ]]; then
        echo "stage_wheels.sh: no wheel for $spec in $out/wheels after the download" >&2
        exit 1
    fi
    wanted+=("$(basename "${match[0]}")")
done

rm -rf "$out/pieces" "$out/dali-wheels.tar"
mkdir -p "$out/pieces"
tar --create --file "$out/dali-wheels.tar" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -C "$out/wheels" "${wanted[@]}"
split --bytes="${piece_mib}M" --numeric-suffixes --suffix-length=2 "$out/dali-wheels.tar" \
    "$out/pieces/dali-wheels.tar."
(cd "$out/pieces" && sha256sum dali-wheels.tar.[0-9][0-9] >SHA256SUMS)
(cd "$out" && sha256sum dali-wheels.tar >>pieces/SHA256SUMS)
rm "$out/dali-wheels.tar"

echo "stage_wheels: $(ls "$out"/pieces/dali-wheels.tar.* | wc -l) pieces in $out/pieces (at most $piece_mib MiB each):"
(cd "$out/pieces" && ls -l dali-wheels.tar.* SHA256SUMS | awk '{printf "  %-24s %12d bytes\n", $NF, $5}')
