//! `tailscope import`: a Hugging Face folder or a GGUF file saved as a tailscope checkpoint.

use std::path::PathBuf;

use clap::Args;

use super::Global;
use crate::io::write_tensors;

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
    let imp = crate::source::read_imported(&a.source)?;
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
        let named = crate::source::check_logits(&a.out, &a.check)?;
        write_tensors(&named, &a.out.join("check.safetensors"))?;
        println!("wrote {}", a.out.join("check.safetensors").display());
    }
    println!("wrote {}", a.out.display());
    Ok(())
}
