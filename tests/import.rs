//! Imports checked against the libraries the models come from: `scripts/make-hf-fixtures` builds
//! tiny random GPT-2, Llama (grouped-query) and BERT models with `transformers` and records their
//! logits; tailscope loads the folders and must match to 1e-4. Damaged or mismatched files must
//! give errors naming the tensor or field.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use tailscope::source::load_model;

/// The fixtures, built once per test run into a temporary folder.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tailscope-hf-{}", std::process::id()));
        let python =
            std::env::var("TAILSCOPE_PYTHON").expect("TAILSCOPE_PYTHON (written by scripts/setup)");
        let out = Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/make-hf-fixtures"
            ))
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make-hf-fixtures (needs transformers: scripts/setup --test-deps): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

fn reference(dir: &Path) -> (Tensor, Tensor) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<Vec<i64>> = serde_json::from_value(v["input_ids"].clone()).unwrap();
    let logits: Vec<Vec<Vec<f32>>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let (b, t, k) = (
        ids.len() as i64,
        ids[0].len() as i64,
        logits[0][0].len() as i64,
    );
    let ids = Tensor::from_slice(&ids.concat()).view([b, t]);
    let flat: Vec<f32> = logits.into_iter().flatten().flatten().collect();
    (ids, Tensor::from_slice(&flat).view([b, t, k]))
}

/// Max |ours − transformers| over the positions `mask` marks real.
fn max_diff(name: &str, mask: &[[bool; 8]; 2]) -> f64 {
    let dir = fixtures().join(name);
    let (ids, want) = reference(&dir);
    let model_path = match name {
        "llama-gguf" => dir.join("model.gguf"),
        _ => dir.clone(),
    };
    let (_, model) = load_model(&model_path, Device::Cpu).unwrap();
    let m = Tensor::from_slice(&mask.concat()).view([2, 8]);
    let got = tch::no_grad(|| model.forward_t(&ids, &m, false, false).unwrap().logits);
    let diff = (got.to_kind(Kind::Float) - want).abs() * m.unsqueeze(-1).to_kind(Kind::Float);
    diff.max().double_value(&[])
}

#[test]
fn gpt2_llama_and_bert_match_transformers() {
    let all = [[true; 8]; 2];
    for name in ["gpt2", "llama"] {
        let d = max_diff(name, &all);
        assert!(d < 1e-4, "{name}: max |Δlogit| {d}");
    }
    let bert = [
        [true; 8],
        [true, true, true, true, true, true, false, false],
    ];
    let d = max_diff("bert", &bert);
    assert!(d < 1e-4, "bert: max |Δlogit| {d}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// A copy of fixture `name` whose config.json has `from` replaced by `to`.
fn edited(tmp: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let d = tmp.join(format!("{name}-{}", to.len()));
    copy_dir(&fixtures().join(name), &d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    assert!(cfg.contains(from), "{from}");
    std::fs::write(d.join("config.json"), cfg.replace(from, to)).unwrap();
    d
}

fn load_err(dir: &Path) -> String {
    match load_model(dir, Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => {
            assert!(e.is_bad_input(), "{e}");
            e.to_string()
        }
    }
}

#[test]
fn damaged_or_mismatched_imports_name_the_tensor_or_field() {
    let tmp = tempfile::tempdir().unwrap();
    // Truncated weights.
    let d = tmp.path().join("trunc");
    copy_dir(&fixtures().join("llama"), &d);
    let w = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("safetensors"),
        "{e}"
    );
    // Config and weights disagree: one more layer than the file holds; a width the tensors do
    // not have.
    let d = edited(tmp.path(), "gpt2", "\"n_layer\": 2", "\"n_layer\": 3");
    let e = load_err(&d);
    assert!(e.contains("h.2.ln_1.weight"), "{e}");
    let d = edited(
        tmp.path(),
        "bert",
        "\"intermediate_size\": 40",
        "\"intermediate_size\": 44",
    );
    let e = load_err(&d);
    assert!(e.contains("c_fc") && e.contains("44"), "{e}");
    // Options tailscope cannot reproduce, and a missing field.
    let d = edited(
        tmp.path(),
        "llama",
        "\"attention_bias\": false",
        "\"attention_bias\": true",
    );
    assert!(load_err(&d).contains("attention_bias"));
    let d = edited(tmp.path(), "llama", "\"hidden_size\"", "\"hidden\"");
    assert!(load_err(&d).contains("hidden_size"));
}

/// A GGUF file written as llama.cpp does (Q8_0, Q4_0, Q4_1, F16, F32; rotary rows permuted):
/// tailscope's dequantised model gives the logits of transformers' own GGUF loader, and the
/// tokenizer rebuilt from the metadata maps each character to its id.
#[test]
fn gguf_matches_transformers_gguf_loader() {
    let d = max_diff("llama-gguf", &[[true; 8]; 2]);
    assert!(d < 1e-4, "llama gguf: max |Δlogit| {d}");
    let path = fixtures().join("llama-gguf/model.gguf");
    let tok = tailscope::source::model_tokenizer(&path).unwrap().unwrap();
    let enc = tok.encode("!#A", false).unwrap();
    assert_eq!(enc.get_ids(), &[0, 2, 32]);
    // Damage: truncated data, then an unsupported quantisation type named with its tensor.
    let bytes = std::fs::read(&path).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&cut);
    assert!(e.contains("cut.gguf") && e.contains("past the end"), "{e}");
    let g = tailscope::import::gguf_format::Gguf::parse(&bytes).unwrap();
    let info = g
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    // Directory entry: name (u64 length + bytes), n_dims u32, dims u64 each, type u32, offset
    // u64. Patch the type to Q6_K (14), which tailscope does not dequantise.
    let at = bytes
        .windows(info.name.len())
        .position(|w| w == info.name.as_bytes())
        .unwrap()
        + info.name.len()
        + 4
        + 8 * info.dims.len();
    let mut bad = bytes.clone();
    bad[at..at + 4].copy_from_slice(&14u32.to_le_bytes());
    let q6 = tmp.path().join("q6.gguf");
    std::fs::write(&q6, &bad).unwrap();
    let e = load_err(&q6);
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("Q6_K"),
        "{e}"
    );
}

/// A TorchScript module outside tailscope's layer set: the exact capture's NTK equals the
/// float64 autograd kernel of the module itself; the batched tape is refused with a reason.
#[test]
fn torchscript_ntk_matches_autograd() {
    use tailscope::capture::{capture, CaptureOptions, Method, Selection};
    let dir = fixtures().join("torchscript");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let seqs: Vec<Vec<u32>> = serde_json::from_value(v["seqs"].clone()).unwrap();
    let want: Vec<Vec<f64>> = serde_json::from_value(v["kernel"].clone()).unwrap();
    let n = want.len() as i64;
    let want = Tensor::from_slice(&want.concat()).view([n, n]);
    let (vs, model) = load_model(&dir.join("model.pt"), Device::Cpu).unwrap();
    let params = Selection::default()
        .select_from(model.capture_parameters(&vs).unwrap())
        .unwrap();
    assert_eq!(params.len(), 5, "emb, mix and head parameters");
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let opts = CaptureOptions {
        method: Method::Exact,
        ..CaptureOptions::default()
    };
    let c = capture(&model, &params, &refs, &opts, Device::Cpu, &|_| {}).unwrap();
    let mut k = Tensor::zeros([n, n], (Kind::Double, Device::Cpu));
    for j in c.jac.iter().flatten() {
        let j = j.to_kind(Kind::Double);
        k += j.matmul(&j.tr());
    }
    let rel = ((&k - &want).abs().max() / want.abs().max()).double_value(&[]);
    assert!(rel < 1e-4, "relative error {rel}");
    let batched = CaptureOptions {
        method: Method::Batched,
        ..CaptureOptions::default()
    };
    let e = match capture(&model, &params, &refs, &batched, Device::Cpu, &|_| {}) {
        Ok(_) => panic!("the batched tape ran on a TorchScript module"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("exact"), "{e}");
}

/// A TorchScript module whose parameter holds a NaN is refused when loaded, naming the tensor
/// (checked through the module's own parameter list, before any forward pass).
#[test]
fn torchscript_with_nan_weights_is_refused() {
    let dir = fixtures().join("torchscript");
    let tmp = tempfile::tempdir().unwrap();
    let module = tch::CModule::load(dir.join("model.pt")).unwrap();
    let params = module.named_parameters().unwrap();
    let (name, t) = &params[0];
    tch::no_grad(|| {
        let _ = t.view(-1).get(0).fill_(f64::NAN);
    });
    let pt = tmp.path().join("model.pt");
    module.save(&pt).unwrap();
    std::fs::copy(dir.join("model.json"), tmp.path().join("model.json")).unwrap();
    let e = match load_model(&pt, Device::Cpu) {
        Ok(_) => panic!("a module with a NaN weight loaded"),
        Err(e) => e,
    };
    assert!(e.is_bad_input(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("model.pt")
            && msg.contains(&format!("`{name}`"))
            && msg.contains("1 non-finite"),
        "{msg}"
    );
}
