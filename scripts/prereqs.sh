# Sourced by the other scripts: installs what building Warbler needs and picks a cargo
# target directory that outlives a fresh clone (the bundled RocksDB takes ~30 min to build
# on 2 cores, so it is built once per machine, not once per clone).

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install a Rust toolchain (>= 1.88), e.g. from rustup.rs" >&2
    exit 1
fi

# bindgen (used by the rocksdb crate) needs libclang; the C++ build needs clang.
if ! command -v clang >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
    echo "installing build prerequisites: clang libclang-dev" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang libclang-dev >/dev/null
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warbler-target}"
mkdir -p "$CARGO_TARGET_DIR"
