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
    for (dir, variant) in TARGETS {
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
