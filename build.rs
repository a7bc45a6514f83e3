//! Embeds the committed PTX (`ptx/<target>/<module>.ptx`), or, when `FK_NVCC` names an
//! nvcc, compiles `cuda/*.cu` with it (for drivers older than the committed PTX needs).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGETS: [(&str, &str); 3] = [("sm_80", "Sm80"), ("sm_89", "Sm89"), ("sm_90a", "Sm90a")];

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=FK_NVCC");
    // FK_PTX_EMBED=0 embeds no PTX: the binary then reads it from $FK_PTX_DIR at run time
    // (the GPU check's bundle does, to stay small).
    println!("cargo:rerun-if-env-changed=FK_PTX_EMBED");
    let embed = env::var("FK_PTX_EMBED").map_or(true, |v| v != "0");
    println!("cargo:rerun-if-changed=ptx");
    println!("cargo:rerun-if-changed=cuda");

    let nvcc = env::var("FK_NVCC").ok().filter(|s| !s.is_empty());
    let ptx_root = match &nvcc {
        Some(nvcc) => compile_ptx(&root, &out, nvcc),
        None => root.join("ptx"),
    };

    let mut table = String::new();
    writeln!(
        table,
        "pub(super) const BUILT_FROM_SOURCE: bool = {};",
        nvcc.is_some()
    )
    .unwrap();
    writeln!(
        table,
        "pub(super) static MODULES: &[(&str, Target, &str)] = &["
    )
    .unwrap();
    for (dir, variant) in TARGETS.into_iter().filter(|_| embed) {
        for ptx in sorted_files(&ptx_root.join(dir), "ptx") {
            let module = ptx.file_stem().unwrap().to_str().unwrap().to_string();
            writeln!(
                table,
                "    ({module:?}, Target::{variant}, include_str!({:?})),",
                ptx.display()
            )
            .unwrap();
        }
    }
    writeln!(table, "];").unwrap();
    fs::write(out.join("ptx_table.rs"), table).unwrap();

    #[cfg(feature = "emu")]
    build_emulator(&root);
}

/// The host emulator (cuda/emu/) and every kernel source compiled for the host, as one
/// static library linked whole: kernels register themselves from static initializers,
/// which a plain static link would drop.
#[cfg(feature = "emu")]
fn build_emulator(root: &Path) {
    let cuda = root.join("cuda");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .include(&cuda)
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        // No contraction of a*b+c into fma, as nvcc is told (-fmad=false): results match
        // the GPU and the references bit for bit.
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag("-fno-extern-tls-init")
        .flag_if_supported("-Wno-unused-parameter")
        // The params structs holding tensor maps are 64-byte aligned; GCC notes that such
        // by-value arguments' ABI changed in GCC 4.6, which matters to no one here.
        .flag_if_supported("-Wno-psabi")
        // `#pragma unroll` is for nvcc.
        .flag_if_supported("-Wno-unknown-pragmas")
        .link_lib_modifier("+whole-archive");
    if env::var("FK_EMU_ASAN").is_ok_and(|v| v == "1") {
        build
            .flag("-fsanitize=address")
            .flag("-fno-omit-frame-pointer");
        println!("cargo:rustc-link-lib=dylib=asan");
        println!("cargo:rustc-cfg=fk_emu_asan");
    }
    println!("cargo:rerun-if-env-changed=FK_EMU_ASAN");
    println!("cargo::rustc-check-cfg=cfg(fk_emu_asan)");
    for f in sorted_files(&cuda.join("emu"), "cpp") {
        build.file(f);
    }
    build.file(cuda.join("emu/switch.S"));
    // Each .cu file through a one-line .cpp that includes it: the emulator headers make
    // CUDA C++ plain C++, and the compiler then needs no language flag.
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("emu_kernels");
    fs::create_dir_all(&out).unwrap();
    for dir in [cuda.clone(), cuda.join("emu/tests")] {
        for cu in sorted_files(&dir, "cu") {
            let name = cu
                .strip_prefix(&cuda)
                .unwrap()
                .to_str()
                .unwrap()
                .replace(['/', '.'], "_");
            let unit = out.join(format!("{name}.cpp"));
            fs::write(&unit, format!("#include {:?}\n", cu.display().to_string())).unwrap();
            build.file(unit);
        }
    }
    build.compile("fk_emu");
}

fn sorted_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

/// The same command line as scripts/gen-ptx.sh: flags from cuda/nvcc.flags.
fn compile_ptx(root: &Path, out: &Path, nvcc: &str) -> PathBuf {
    let flags = fs::read_to_string(root.join("cuda/nvcc.flags")).unwrap();
    let ptx_root = out.join("ptx");
    for (dir, _) in TARGETS {
        fs::create_dir_all(ptx_root.join(dir)).unwrap();
        for cu in sorted_files(&root.join("cuda"), "cu") {
            let dest = ptx_root
                .join(dir)
                .join(cu.file_stem().unwrap())
                .with_extension("ptx");
            let status = Command::new(nvcc)
                .current_dir(root)
                .args(flags.split_whitespace())
                .arg(format!("-arch={dir}"))
                .arg("-ptx")
                .arg(&cu)
                .arg("-o")
                .arg(&dest)
                .status()
                .unwrap_or_else(|e| panic!("FK_NVCC={nvcc}: {e}"));
            assert!(
                status.success(),
                "FK_NVCC={nvcc} failed on {}",
                cu.display()
            );
        }
    }
    ptx_root
}
