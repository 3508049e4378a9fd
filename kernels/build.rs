//! Compiles the GLSL compute shaders in `shaders/` to SPIR-V with `glslc`, validates them with
//! `spirv-val` when it is installed, and writes `kernels.rs` into OUT_DIR: the `KernelId` enum with
//! one variant per kernel listed in the `shaders/*.kernels` manifests, and the SPIR-V of each.
//!
//! One source file may be compiled several times with different `-D` defines (one matvec source
//! for every weight type, say); each compilation is its own kernel id.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Kernel manifests: every `shaders/*.kernels` file lists kernels, one per line:
/// `id source.comp [DEFINE ...]` (`#` starts a comment). The id becomes a `KernelId` variant in
/// UpperCamelCase; the defines are passed to glslc as `-DNAME` (or `-DNAME=VALUE`).
fn manifests(shaders: &Path) -> Vec<(String, String, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(shaders)
        .expect("shaders/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "kernels"))
        .collect();
    files.sort();
    let mut out: Vec<(String, String, Vec<String>)> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap().trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace().map(str::to_string);
            let (Some(id), Some(source)) = (words.next(), words.next()) else {
                panic!(
                    "{}:{}: expected `id source.comp [DEFINES]`",
                    f.display(),
                    i + 1
                );
            };
            if out.iter().any(|(other, _, _)| *other == id) {
                panic!("{}:{}: kernel id {id} is used twice", f.display(), i + 1);
            }
            out.push((id, source, words.collect()));
        }
    }
    out
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let shaders = manifest.join("shaders");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=build.rs");

    let glslc = which("glslc").unwrap_or_else(|| {
        panic!(
            "glslc was not found on PATH; halo-kernels compiles its GLSL shaders with it. \
             On Debian/Ubuntu: apt-get install glslc (and spirv-tools for validation)"
        )
    });
    let spirv_val = which("spirv-val");
    if spirv_val.is_none() {
        println!("cargo:warning=spirv-val not found (Debian package spirv-tools); SPIR-V is not validated");
    }

    let mut variants = String::new();
    let mut names = String::new();
    let mut blobs = String::new();
    let mut all = String::new();
    for (id, source, defines) in &manifests(&shaders) {
        let src = shaders.join(source);
        let spv = out.join(format!("{id}.spv"));
        let mut cmd = Command::new(&glslc);
        cmd.arg("--target-env=vulkan1.2")
            .arg("-O")
            .arg("-Werror")
            .arg("-I")
            .arg(shaders.join("include"))
            .arg("-fshader-stage=compute");
        for d in defines {
            cmd.arg(format!("-D{d}"));
        }
        cmd.arg(&src).arg("-o").arg(&spv);
        run(cmd, &format!("compiling {source} as {id}"));
        if let Some(val) = &spirv_val {
            let mut v = Command::new(val);
            v.arg("--target-env").arg("vulkan1.2").arg(&spv);
            run(v, &format!("validating {id}.spv"));
        }
        let camel = camel(id);
        variants.push_str(&format!("    {camel},\n"));
        names.push_str(&format!("            KernelId::{camel} => {id:?},\n"));
        blobs.push_str(&format!(
            "            KernelId::{camel} => include_bytes!({:?}),\n",
            spv.display().to_string()
        ));
        all.push_str(&format!("KernelId::{camel}, "));
    }

    let code = format!(
        "/// Every compute kernel halo ships, one per compiled shader variant.\n\
         #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]\n\
         pub enum KernelId {{\n{variants}}}\n\n\
         impl KernelId {{\n\
         \x20   /// All kernels, in declaration order.\n\
         \x20   pub const ALL: &'static [KernelId] = &[{all}];\n\n\
         \x20   /// The kernel's name, as in build.rs.\n\
         \x20   pub fn name(self) -> &'static str {{\n        match self {{\n{names}        }}\n    }}\n\n\
         \x20   /// The kernel's SPIR-V.\n\
         \x20   pub(crate) fn spirv(self) -> &'static [u8] {{\n        match self {{\n{blobs}        }}\n    }}\n\
         }}\n"
    );
    std::fs::write(out.join("kernels.rs"), code).unwrap();
}

fn camel(id: &str) -> String {
    id.split('_')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {:?}: {e}", cmd.get_program()));
    if !out.status.success() {
        panic!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
