//! Records the target triple so bundles can carry one library per platform.
fn main() {
    let target = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
    println!("cargo:rustc-env=TROUPE_TARGET={target}");
}
