//! Compiles every `src/bpf/*.bpf.c` into a libbpf skeleton and the gRPC
//! protocol into tonic/prost code, both under `OUT_DIR`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;

fn vmlinux_arch() -> &'static str {
    match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => panic!("no committed vmlinux.h for target arch {other}"),
        Err(e) => panic!("CARGO_CFG_TARGET_ARCH: {e}"),
    }
}

fn build_bpf(out: &Path) {
    let arch = vmlinux_arch();
    let vmlinux = Path::new("vmlinux").join(arch);
    let target_define = format!("-D__TARGET_ARCH_{arch}");
    let files: Vec<PathBuf> = fs::read_dir("src/bpf")
        .expect("src/bpf")
        .map(|e| e.expect("src/bpf entry").path())
        .collect();
    // Programs share headers: a change to any of them rebuilds every program.
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut sources: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for src in sources {
        let stem = src
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".bpf.c"))
            .expect("bpf source name")
            .to_owned();
        SkeletonBuilder::new()
            .source(&src)
            .clang_args([
                "-I".as_ref(),
                vmlinux.as_os_str(),
                "-I".as_ref(),
                "src/bpf".as_ref(),
                target_define.as_ref(),
                // atomic exchange and fetching atomics (probation.h): BPF ISA v3,
                // kernels 5.12 and later
                "-mcpu=v3".as_ref(),
                "-Wall".as_ref(),
                "-Werror".as_ref(),
            ])
            .build_and_generate(out.join(format!("{stem}.skel.rs")))
            .unwrap_or_else(|e| panic!("building {}: {e:#}", src.display()));
    }
    println!("cargo:rerun-if-changed=src/bpf");
    println!("cargo:rerun-if-changed={}", vmlinux.display());
}

fn build_proto(out: &Path) {
    // Messages and the client from the proto; the server is generated below.
    tonic_prost_build::configure()
        .build_server(false)
        .file_descriptor_set_path(out.join("flowlens_descriptor.bin"))
        .compile_protos(&["proto/flowlens/v1/flowlens.proto"], &["proto"])
        .expect("compiling proto/flowlens/v1/flowlens.proto");
    println!("cargo:rerun-if-changed=proto");
}

/// The FlowLens server's unary methods, declared by hand: Subscribe is served by a route of
/// its own (`sinks::grpc::subscribe`) that writes its gRPC messages itself, so that records
/// encoded and compressed once are shared by every subscriber. The routes and the wire
/// format are those of the proto.
fn build_server(out: &Path) {
    use tonic_build::manual::{Builder, Method, Service};
    let method = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(input)
            .output_type(output)
            .codec_path("tonic_prost::ProstCodec")
    };
    let service = Service::builder()
        .name("FlowLens")
        .package("flowlens.v1")
        .method(
            method(
                "list_flows",
                "ListFlows",
                "crate::record::api::proto::ListFlowsRequest",
                "crate::record::api::proto::ListFlowsResponse",
            )
            .build(),
        )
        .method(
            method(
                "get_status",
                "GetStatus",
                "crate::record::api::proto::GetStatusRequest",
                "crate::record::api::proto::GetStatusResponse",
            )
            .build(),
        )
        .build();
    Builder::new()
        .build_client(false)
        .out_dir(out)
        .compile(&[service]);
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    build_bpf(&out);
    build_proto(&out);
    build_server(&out);
}
