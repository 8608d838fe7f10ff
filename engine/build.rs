//! Records the target triple so bundles can carry one library per platform,
//! and rebuilds the engine when a migration changes (`sqlx::migrate!` embeds
//! them at compile time).
fn main() {
    let target = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
    println!("cargo:rustc-env=TROUPE_TARGET={target}");
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rerun-if-changed=build.rs");
}
