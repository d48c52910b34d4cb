fn main() {
    // pgrx links its install build with --no-gc-sections; linking the test build the same way lets `cargo pgrx
    // test` reuse one build instead of compiling every dependency twice.
    println!("cargo:rustc-cdylib-link-arg=-Wl,--no-gc-sections");
    // The model the pgrx test cluster loads: the tiny CI model unless COPILOT_TEST_MODEL says otherwise.
    let model = std::env::var("COPILOT_TEST_MODEL")
        .unwrap_or_else(|_| "/var/lib/copilot/models/smollm2-135m-instruct-q4_1.gguf".into());
    println!("cargo:rustc-env=COPILOT_TEST_MODEL_PATH={model}");
    println!("cargo:rerun-if-env-changed=COPILOT_TEST_MODEL");
}
