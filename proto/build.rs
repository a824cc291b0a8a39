fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc gives every clean machine the same compiler; nothing from apt needed.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded at this point.
    unsafe_set_protoc(&protoc);
    println!("cargo:rerun-if-changed=kiln/v1/kiln.proto");
    tonic_prost_build::configure().compile_protos(&["kiln/v1/kiln.proto"], &["."])?;
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // `set_var` is unsafe in edition 2024 because other threads may read the environment;
    // a build script has no other threads.
    unsafe { std::env::set_var("PROTOC", path) };
}
