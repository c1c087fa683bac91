#!/usr/bin/env bash
# Installs Triton's perf_analyzer (a light C++ KServe v2 load generator) into a private folder,
# changing nothing system-wide. Its PyPI wheel needs glibc 2.38; Debian 12 has 2.36, so the binary
# is started through a private sysroot holding Debian 13's libc, libstdc++ and libgcc.
# A plain `pip install perf-analyzer` would install an empty 0.1.0 placeholder: hence --platform.
# Usage: benchmarks/install_perf_analyzer.sh [DIR]   (default .cache/perf_analyzer); prints the launcher path.
set -euo pipefail
DIR=$(realpath -m "${1:-.cache/perf_analyzer}")
PY=${PYTHON:-python3}
LAUNCHER="$DIR/perf_analyzer"
if [ -x "$LAUNCHER" ] && "$LAUNCHER" --version >/dev/null 2>&1; then echo "$LAUNCHER"; exit 0; fi
mkdir -p "$DIR/wheel" "$DIR/debs" "$DIR/sysroot" "$DIR/apt/lists/partial" "$DIR/apt/cache/archives/partial"
"$PY" -m pip install --quiet --disable-pip-version-check --target "$DIR/wheel" \
    --platform manylinux_2_38_x86_64 --only-binary=:all: --no-deps perf-analyzer==2.60.0 >&2
BIN="$DIR/wheel/perf_analyzer/bin/perf_analyzer"
[ -x "$BIN" ] || { echo "no perf_analyzer binary in the wheel" >&2; exit 1; }

# A private apt state that knows Debian 13 (trixie) only: nothing under /etc or /var changes.
cat > "$DIR/apt/sources.list" <<SRC
deb http://deb.debian.org/debian trixie main
SRC
APT_OPTS=(-o "Dir::Etc::SourceList=$DIR/apt/sources.list" -o "Dir::Etc::SourceParts=-"
    -o "Dir::State=$DIR/apt" -o "Dir::State::Lists=$DIR/apt/lists" -o "Dir::Cache=$DIR/apt/cache"
    -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" -o "Acquire::Check-Valid-Until=false"
    -o "Acquire::AllowInsecureRepositories=true" -o "Dir::Etc::Trusted=/etc/apt/trusted.gpg"
    -o "Dir::Etc::TrustedParts=/etc/apt/trusted.gpg.d")
apt-get "${APT_OPTS[@]}" update >&2
(cd "$DIR/debs" && apt-get "${APT_OPTS[@]}" download libc6 libstdc++6 libgcc-s1 >&2)
for deb in "$DIR"/debs/*.deb; do dpkg-deb -x "$deb" "$DIR/sysroot"; done

LIBS="$DIR/sysroot/lib/x86_64-linux-gnu:$DIR/sysroot/usr/lib/x86_64-linux-gnu:$(dirname "$BIN")"
for extra in $(find "$DIR/wheel" -name '*.so*' -printf '%h\n' | sort -u); do LIBS="$LIBS:$extra"; done
cat > "$LAUNCHER" <<RUN
#!/bin/sh
exec "$DIR/sysroot/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$LIBS" "$BIN" "\$@"
RUN
chmod +x "$LAUNCHER"
"$LAUNCHER" --version >&2 || true
echo "$LAUNCHER"
