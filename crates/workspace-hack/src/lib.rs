//! No code: this crate only exists for its dependency list (see Cargo.toml), which makes the
//! server, the engine's example, `cargo xtask` and the test suite resolve every shared
//! dependency with the same features, so building one does not rebuild the others'.
