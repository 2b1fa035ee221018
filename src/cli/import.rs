//! `tailscope import`: a Hugging Face folder or a GGUF file saved as a tailscope checkpoint.

use std::path::PathBuf;

use clap::Args;
use tch::{Kind, Tensor};

use super::Global;
use crate::model::checkpoint::write_tensors;

#[derive(Debug, Clone, Args)]
#[command(
    about = "Save a pretrained model (Hugging Face folder or GGUF file) as a tailscope checkpoint",
    long_about = "Save a pretrained model as a tailscope checkpoint folder (config.json, \
        model.safetensors, tokenizer.json).\n\n\
        Sources: a Hugging Face folder (config.json + model.safetensors, optional tokenizer.json) \
        of a GPT-2, Llama-family or BERT masked-LM model, or a Llama-family GGUF file (Q8_0, Q4_0, \
        Q4_1, F16, F32 tensors are dequantised; the tokenizer is rebuilt from the metadata). Every \
        command also takes such a source directly as --model; importing once saves the parsing \
        and dequantising at each run.",
    after_help = "Example:\n  scripts/fetch-models\n  \
        tailscope import out/fetched/models/SmolLM2-135M-Instruct.Q4_1.gguf -o out/models/smollm2 \\\n    \
        --check 'The jury said the election was conducted fairly.'"
)]
pub struct ImportArgs {
    /// A Hugging Face model folder or a GGUF file.
    #[arg(value_name = "SOURCE")]
    pub source: PathBuf,
    /// Output folder.
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,
    /// Texts to run through the imported model: writes check.safetensors (ids (1, T), logits
    /// (1, T, vocab) per text, named ids.K / logits.K) to compare with the source library.
    #[arg(long, value_name = "TEXT")]
    pub check: Vec<String>,
}

pub fn run(a: &ImportArgs, _g: &Global) -> anyhow::Result<()> {
    let imp = crate::import::read(&a.source)?;
    let n_tensors = imp.tensors.len();
    let cfg = imp.save(&a.out)?;
    println!(
        "imported {} ({:?}, {} layers, d_model {}, {} heads / {} kv heads, vocabulary {}): {n_tensors} tensors",
        a.source.display(),
        cfg.arch,
        cfg.n_layer,
        cfg.d_model,
        cfg.n_head,
        cfg.kv_heads(),
        cfg.vocab_size
    );
    if !a.check.is_empty() {
        let (_, model) = crate::model::checkpoint::load_model(&a.out, tch::Device::Cpu)?;
        let tok = super::tokenizer_for(None, &a.out, &model, &a.out)?;
        let mut named = Vec::new();
        for (k, text) in a.check.iter().enumerate() {
            let enc = tok
                .encode(text.as_str(), false)
                .map_err(|e| crate::Error::Tokenizer(e.to_string()))?;
            let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
            let ids = Tensor::from_slice(&ids).view([1, -1]);
            let mask = ids.ones_like().to_kind(Kind::Bool);
            let logits = tch::no_grad(|| model.forward_t(&ids, &mask, false, false))?.logits;
            named.push((format!("ids.{k}"), ids));
            named.push((format!("logits.{k}"), logits));
        }
        write_tensors(&named, &a.out.join("check.safetensors"))?;
        println!("wrote {}", a.out.join("check.safetensors").display());
    }
    println!("wrote {}", a.out.display());
    Ok(())
}
