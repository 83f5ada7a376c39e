//! Compiles `src/user_prefix.cc` against the RocksDB sources the `librocksdb-sys` crate
//! builds (it names their directory for crates that depend on it).

fn main() {
    let rocksdb = std::env::var("DEP_ROCKSDB_CARGO_MANIFEST_DIR")
        .expect("librocksdb-sys names its sources' directory");
    println!("cargo:rerun-if-changed=src/user_prefix.cc");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .include(format!("{rocksdb}/rocksdb/include"))
        .include(format!("{rocksdb}/rocksdb"))
        // As librocksdb-sys compiles RocksDB: some classes differ in debug builds.
        .define("NDEBUG", Some("1"))
        .warnings(false)
        .file("src/user_prefix.cc")
        .compile("warbler_user_prefix");
}
