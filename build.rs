//! Embeds an rpath to libtorch's lib directory so `target/*/tailscope` and the test binaries run
//! without LD_LIBRARY_PATH. `LIBTORCH` comes from the `.cargo/config.toml` that `scripts/setup`
//! writes (or from the environment).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
}
