"""Peer suite on a real model (driven by scripts/bench-peers; a benchmark, not a test).

SmolLM2-135M (tailscope's dequantised GGUF weights, loaded into transformers'
LlamaForCausalLM for the peers), Brown validation sentences, the mean token loss of each
sentence, and two parameter selections:
  a: the MLPs of the last two blocks (h.28, h.29: 6 matrices, 5.3 M parameters);
  b: every Linear layer of the 30 blocks (q, k, v, o, gate, up, down: 210 matrices, 106 M
     parameters; the output layer is the tied token embedding, not a Linear, and is left out).
Methods, each in a process of its own (so that its peak RSS is its own):
  tailscope  `ntk` (the binary), batched per-sample gradients, or ghost kernels where cheaper;
  torch.func vmap(grad) over functional_call of the transformers model;
  opacus     GradSampleModule (hooks on every selected Linear);
  bergson    InMemoryCollector + CollectorComputer (what collect_gradients runs, kept in memory).
Projections at K dimensions per matrix: tailscope's own (sparse, gaussian, kronecker); bergson's
own (double-sided per module, projection_dim = sqrt(K), Gaussian); torch.func and Opacus have
none, so this script applies to their per-sample gradients the same kinds tailscope has,
written here in torch (sparse: Kane-Nelson with s = 8 nonzeros per row in blocks of K/8
columns; gaussian: N(0, 1/K) generated in row chunks once per group of up to GROUP samples,
the way a user without a projection library would write it).
Agreement: unprojected kernels of every peer on SUBSET samples against tailscope's and against
each other (relative max |difference|, goal 1e-5); projected kernels against tailscope's
unprojected kernel of all N samples (relative Frobenius error); for selection b, whose 106 M
per-sample gradients of 128 samples would take 54 GB, against the subset's unprojected kernel,
on the subset's rows and columns of the projected one.
Throughput: samples/s = N / (capture + projection + kernel), model loading excluded; peak RSS of
the whole process. Every figure comes from this one run.
"""
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE_S = 8


# ---------------------------------------------------------------- shared helpers


def selection_names(sel, n_layer=30):
    """Tailscope's parameter names of a selection."""
    mlp = ["gate_proj", "up_proj", "down_proj"]
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if sel == "a":
        return [f"h.{i}.mlp.{m}.weight" for i in (n_layer - 2, n_layer - 1) for m in mlp]
    if sel == "b":
        return [f"h.{i}.attn.{m}.weight" for i in range(n_layer) for m in attn] + [
            f"h.{i}.mlp.{m}.weight" for i in range(n_layer) for m in mlp
        ]
    raise SystemExit(f"bench-peers: unknown selection {sel!r} (a or b)")


def hf_name(name):
    """tailscope name -> transformers' LlamaForCausalLM name (as scripts/check-gguf maps them)."""
    part_map = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn": "self_attn", "mlp": "mlp"}
    top = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    _, i, part, rest = name.split(".", 3)
    return f"model.layers.{i}.{part_map[part]}.{rest}"


def load_total(path):
    from safetensors.torch import load_file

    return load_file(path)["total"].double()


# ---------------------------------------------------------------- workers (one process each)


def load_hf(model_dir):
    import torch
    import transformers as tf
    from safetensors.torch import load_file

    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    if cfg["arch"] != "llama":
        raise SystemExit("bench-peers: the peers' model is a Llama checkpoint (tailscope import of SmolLM2)")
    hcfg = tf.LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["d_model"],
        intermediate_size=cfg["d_ffn"],
        num_hidden_layers=cfg["n_layer"],
        num_attention_heads=cfg["n_head"],
        num_key_value_heads=cfg["n_kv_head"],
        rms_norm_eps=cfg["norm_eps"],
        rope_theta=cfg["rope_theta"],
        max_position_embeddings=cfg["max_len"],
        tie_word_embeddings=cfg["tie_embeddings"],
        hidden_act="silu",
        attn_implementation=os.environ.get("BENCH_ATTN", "eager"),
    )
    model = tf.LlamaForCausalLM(hcfg).eval()
    sd = {hf_name(k): v for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    if cfg["tie_embeddings"]:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise SystemExit(f"bench-peers: weights do not fit LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.requires_grad_(False)
    return model, cfg


def batches_by_length(mask, batch):
    """Sample indices in batches of `batch`, sorted by length (tailscope does the same)."""
    lengths = mask.sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch] for s in range(0, len(order), batch)], lengths


class Projector:
    """Per-module projection of materialised per-sample gradients (b, out, in) -> (b, k)."""

    def __init__(self, kind, k, shapes, seed):
        import torch

        self.kind, self.k, self.seed = kind, k, seed
        self.sparse = {}
        self.kron = {}
        if kind == "sparse":
            block = k // SPARSE_S
            if block * SPARSE_S != k:
                raise SystemExit(f"bench-peers: K = {k} must be a multiple of {SPARSE_S} for the sparse projection")
            dt = torch.uint8 if block <= 256 else torch.int16
            for m, (name, shape) in enumerate(shapes.items()):
                g = torch.Generator().manual_seed(seed * 100003 + m)
                p = math.prod(shape)
                # one column in each of the s blocks (distinct columns), a sign each; held compactly
                off = torch.randint(0, block, (p, SPARSE_S), generator=g).to(dt)
                sign = torch.randint(0, 2, (p, SPARSE_S), generator=g, dtype=torch.int8)
                self.sparse[name] = (off, sign)
        elif kind == "kronecker":
            k1 = math.isqrt(k - 1) + 1
            for m, (name, (o, i)) in enumerate(shapes.items()):
                g = torch.Generator().manual_seed(seed * 100003 + m)
                self.kron[name] = (torch.randn(o, k1, generator=g) / math.sqrt(k1), torch.randn(i, k1, generator=g) / math.sqrt(k1))

    def project(self, name, m, G):
        """G: (b, out, in) float32 -> (b, k)."""
        import torch

        b = G.shape[0]
        flat = G.reshape(b, -1)
        if self.kind == "sparse":
            off, sign = self.sparse[name]
            block = self.k // SPARSE_S
            out = torch.zeros(b, self.k, dtype=flat.dtype)
            scale = 1.0 / math.sqrt(SPARSE_S)
            for j in range(SPARSE_S):
                cols = off[:, j].long() + j * block
                signed = flat * ((sign[:, j].to(flat.dtype) * 2 - 1) * scale)
                out.index_add_(1, cols, signed)
            return out
        if self.kind == "kronecker":
            pg, px = self.kron[name]
            return torch.einsum("bij,ik,jl->bkl", G, pg, px).reshape(b, -1)
        if self.kind == "gaussian":
            # rows of R (P x k) regenerated in chunks from a per-module seed: R is the same for
            # every group of samples, never held whole (6 matrices x 3.6 GB for selection a)
            g = torch.Generator().manual_seed(self.seed * 100003 + m)
            p = flat.shape[1]
            out = torch.zeros(b, self.k, dtype=flat.dtype)
            chunk = max(1, (1 << 27) // self.k)  # 512 MB of float32 per chunk
            for s in range(0, p, chunk):
                e = min(p, s + chunk)
                r = torch.randn(e - s, self.k, generator=g) / math.sqrt(self.k)
                out.addmm_(flat[:, s:e], r)
            return out
        raise SystemExit(f"bench-peers: unknown projection {self.kind}")


def run_peer(method, sel, proj, k, batch_file, model_dir, out_file, batch, group):
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model, cfg = load_hf(model_dir)
    names = selection_names(sel, cfg["n_layer"])
    params = {hf_name(n): model.get_parameter(hf_name(n)) for n in names}
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    B = load_file(batch_file)
    ids, mask, tgt = B["ids"], B["mask"], B["targets"]
    n = ids.shape[0]
    groups, lengths = batches_by_length(mask, batch)
    t0 = time.time()
    projector = Projector(proj, k, shapes, seed=0) if proj != "none" and method != "bergson" else None
    t_setup = time.time() - t0
    # per-module rows of J (projected or not), in sample order
    rows = {nm: [None] * n for nm in params}

    def keep(nm, m, idx, G):
        G = G.detach()
        if projector is not None and projector.kind != "gaussian":
            G = projector.project(nm, m, G)
        else:
            G = G.reshape(G.shape[0], -1)
        for r, i in enumerate(idx):
            rows[nm][i] = G[r].clone()

    pending = []  # (idx, {name: G}) waiting for a gaussian projection, as one group

    def flush_gaussian():
        if not pending:
            return
        idx = [i for ids_, _ in pending for i in ids_]
        for m, nm in enumerate(params):
            G = torch.cat([g[nm] for _, g in pending], 0)
            P = projector.project(nm, m, G)
            for r, i in enumerate(idx):
                rows[nm][i] = P[r].clone()
        pending.clear()

    def per_sample(idx, grads):
        if projector is not None and projector.kind == "gaussian":
            pending.append((idx, {nm: g.detach() for nm, g in grads.items()}))
            if sum(len(p[0]) for p in pending) >= group:
                flush_gaussian()
        else:
            for m, nm in enumerate(params):
                keep(nm, m, idx, grads[nm])

    t_cap0 = time.time()
    if method == "torch.func":
        from torch.func import functional_call, grad, vmap

        def f(sel_params, ids1, tgt1):
            logits = functional_call(model, sel_params, args=(ids1[None],), kwargs={"use_cache": False}).logits[0]
            valid = tgt1 != -100
            ce = F.cross_entropy(logits, tgt1.clamp(min=0), reduction="none")
            return (ce * valid).sum() / valid.sum()

        g = vmap(grad(f), in_dims=(None, 0, 0))
        for idx in groups:
            t = max(lengths[i] for i in idx)
            grads = g({nm: p.detach() for nm, p in params.items()}, ids[idx, :t], tgt[idx, :t])
            per_sample(idx, grads)
    elif method == "opacus":
        from opacus import GradSampleModule

        for p in params.values():
            p.requires_grad_(True)
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        # Opacus records activations in training mode only; SmolLM2 has no dropout, so the
        # forward is the evaluation one
        gsm.train()
        for idx in groups:
            t = max(lengths[i] for i in idx)
            x, y = ids[idx, :t], tgt[idx, :t]
            logits = gsm(input_ids=x, use_cache=False).logits
            valid = y != -100
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.clamp(min=0).reshape(-1), reduction="none").reshape(y.shape)
            ((ce * valid).sum(1) / valid.sum(1)).sum().backward()
            per_sample(idx, {nm: p.grad_sample for nm, p in params.items()})
            for p in params.values():
                p.grad_sample = None
                p.grad = None
    elif method == "bergson":
        import tempfile

        from datasets import Dataset

        from bergson.collector.collector import CollectorComputer
        from bergson.collector.in_memory_collector import InMemoryCollector
        from bergson.config.config import IndexConfig
        from bergson.gradients import GradientProcessor

        for p in params.values():
            p.requires_grad_(True)
        # bergson predicts token t+1 from the prefix up to t over input_ids; tailscope's batch
        # holds the inputs and next-token targets, so its last target is appended
        seqs = []
        for i in range(n):
            L = lengths[i]
            s = ids[i, :L].tolist()
            if tgt[i, L - 1] != -100:
                s.append(int(tgt[i, L - 1]))
            seqs.append(s)
        data = Dataset.from_dict({"input_ids": seqs})
        pdim = 0 if proj == "none" else math.isqrt(k)
        if pdim and pdim * pdim != k:
            raise SystemExit(f"bench-peers: bergson projects to projection_dim² per module: K = {k} is not a square")
        run = tempfile.mkdtemp(prefix="bergson-")
        cfg_b = IndexConfig(run_path=os.path.join(run, "index"), projection_dim=pdim, projection_type="normal", loss_reduction="mean")
        os.makedirs(cfg_b.partial_run_path, exist_ok=True)
        processor = GradientProcessor(projection_dim=pdim or None, projection_type="normal", projection_seed=0)
        targets = {n_[len("model."):] for n_ in (hf_name(x)[: -len(".weight")] for x in names)}
        collector = InMemoryCollector(model=model.base_model, cfg=cfg_b, processor=processor, target_modules=targets, data=data)
        CollectorComputer(model=model, data=data, collector=collector, batches=groups, cfg=cfg_b).run_with_collector_hooks(desc="bergson")
        for nm in params:
            key = nm[len("model."): -len(".weight")]
            G = collector.gradients[key].float()
            for i in range(n):
                rows[nm][i] = G[i]
    else:
        raise SystemExit(f"bench-peers: unknown method {method}")
    if projector is not None and projector.kind == "gaussian":
        flush_gaussian()
    t_cap = time.time() - t_cap0
    t_k0 = time.time()
    K = torch.zeros(n, n, dtype=torch.float64)
    for nm in params:
        J = torch.stack(rows[nm]).double()
        K += J @ J.T
        rows[nm] = None
    t_kernel = time.time() - t_k0
    torch.save(K, out_file + ".kernel.pt")
    import resource

    json.dump(
        {"seconds": t_setup + t_cap + t_kernel, "setup_s": t_setup, "capture_s": t_cap, "kernel_s": t_kernel, "samples": n,
         "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},
        open(out_file, "w"),
    )


# ---------------------------------------------------------------- driver


def child(cmd, log):
    """Run one method in its own process; its wall time and peak RSS (KiB) from wait4."""
    t0 = time.time()
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, time.time() - t0, ru.ru_maxrss


def driver():
    import torch

    env = os.environ
    bin_, model, corpus, work = env["BENCH_BIN"], env["BENCH_MODEL"], env["BENCH_CORPUS"], env["BENCH_WORK"]
    n, subset, k = int(env["BENCH_N"]), int(env["BENCH_SUBSET"]), int(env["BENCH_K"])
    sels = env["BENCH_SELECT"].split()
    peers = env["BENCH_PEERS"].split()
    group = int(env["BENCH_GROUP"])
    threads = env.get("BENCH_THREADS", "")
    batch_of = {"a": int(env["BENCH_BATCH_A"]), "b": int(env["BENCH_BATCH_B"])}
    os.makedirs(work, exist_ok=True)
    results = []

    def ours(sel, samples, proj, tag, method="batched"):
        out = os.path.join(work, f"{sel}-tailscope-{tag}")
        cmd = [bin_, "-q", "--device", "cpu", "--seed", "0", "ntk", "--model", model, "--corpus", corpus, "--split", "validation",
               "--samples", str(samples), "--blocks", "none", "--method", method, "--batch", str(batch_of[sel]),
               "--gc-resamples", "0", "--export-batch", "-o", out]
        if threads:
            cmd[1:1] = ["--threads", threads]
        for nm in selection_names(sel):
            cmd += ["--params", nm]
        if proj != "none":
            cmd += ["--project", str(k), "--projection", proj]
        code, wall, rss = child(cmd, out + ".log")
        if code != 0:
            return None, f"exit {code}: " + open(out + ".log").read()[-400:]
        info = json.load(open(os.path.join(out, "ntk.json")))
        K = load_total(os.path.join(out, "kernel.safetensors"))
        return {"seconds": info["seconds"], "rss_kib": rss, "wall": wall, "K": K, "batch": os.path.join(out, "batch.safetensors")}, None

    def peer(sel, method, proj, batch_file, tag):
        out = os.path.join(work, f"{sel}-{method}-{tag}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "worker", method, sel, proj, str(k), batch_file, model, out, str(batch_of[sel]), str(group)]
        code, wall, rss = child(cmd, out + ".log")
        if code != 0:
            return None, f"exit {code}: " + open(out + ".log").read()[-600:]
        info = json.load(open(out))
        return {"seconds": info["seconds"], "rss_kib": rss, "wall": wall, "K": torch.load(out + ".kernel.pt"), "detail": info}, None

    def rel_max(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    def rel_fro(a, b):
        return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()

    for sel in sels:
        print(f"\n== selection {sel}: " + ("MLPs of the last two blocks" if sel == "a" else "every Linear layer of the 30 blocks"), flush=True)
        # 1. agreement, unprojected, on SUBSET samples
        ref, err = ours(sel, subset, "none", "exact-subset")
        if ref is None:
            raise SystemExit(f"bench-peers: tailscope failed on the subset: {err}")
        peer_k = {}
        for method in peers:
            r, err = peer(sel, method, "none", ref["batch"], "exact-subset")
            row = {"selection": sel, "method": method, "projection": "none", "samples": subset}
            if r is None:
                row["error"] = err
                print(f"  {method:10s} unprojected: FAILED ({err.strip().splitlines()[-1] if err.strip() else err})", flush=True)
            else:
                row["agreement_rel_max"] = rel_max(r["K"], ref["K"])
                ok = "ok" if row["agreement_rel_max"] <= 1e-5 else "ABOVE 1e-5"
                print(f"  {method:10s} unprojected kernel of {subset} samples vs tailscope: max|ΔK|/max|K| = {row['agreement_rel_max']:.2e} ({ok})", flush=True)
            results.append(row)
            if r is not None:
                peer_k[method] = r["K"]
        names_ = sorted(peer_k)
        for x in range(len(names_)):
            for y in range(x + 1, len(names_)):
                print(f"  {names_[x]} vs {names_[y]} (peers against each other): max|ΔK|/max|K| = {rel_max(peer_k[names_[x]], peer_k[names_[y]]):.2e}")
        # 2. reference: tailscope's unprojected kernel of all N samples; for selection b (106 M
        # per-sample gradients of N samples would take 54 GB) the subset's, and projected
        # kernels are compared on the subset's rows and columns (the subset's samples are found
        # among the N by their tokens)
        from safetensors.torch import load_file

        if sel == "a":
            full, err = ours(sel, n, "none", "exact")
            if full is None:
                raise SystemExit(f"bench-peers: tailscope's unprojected kernel of {n} samples failed: {err}")
            results.append({"selection": sel, "method": "tailscope", "projection": "none", "samples": n, "seconds": full["seconds"],
                            "samples_per_s": n / full["seconds"], "rss_gb": full["rss_kib"] * 1024 / 1e9, "error": None})
            print(f"  tailscope  unprojected, {n} samples: {n / full['seconds']:.2f} samples/s, peak RSS {full['rss_kib'] / 1048576:.2f} GiB", flush=True)
        else:
            full = None

        subset_rows = {}  # N-sample batch file -> rows holding the subset's texts

        def error_of(K, batch_file):
            if full is not None:
                return rel_fro(K, full["K"])
            if batch_file not in subset_rows:
                small, big = load_file(ref["batch"]), load_file(batch_file)
                rows = []
                for i in range(small["ids"].shape[0]):
                    L = int(small["mask"][i].sum())
                    hit = [j for j in range(big["ids"].shape[0]) if int(big["mask"][j].sum()) == L and torch.equal(big["ids"][j, :L], small["ids"][i, :L])]
                    if not hit:
                        raise SystemExit("bench-peers: a subset sample is not among the N samples; choose N a multiple of SUBSET")
                    rows.append(hit[0])
                subset_rows[batch_file] = torch.tensor(rows)
            idx = subset_rows[batch_file]
            return rel_fro(K[idx][:, idx], ref["K"])
        # 3. projected, timed
        batch_n = None
        plan = [("tailscope", p) for p in env["BENCH_OURS_PROJ"].split()]
        for method in peers:
            if method == "bergson":
                plan.append(("bergson", "kronecker"))
            else:
                plan += [(method, p) for p in env[f"BENCH_PEER_PROJ_{sel.upper()}"].split()]
        for method, proj in plan:
            batch_file = (full or {}).get("batch") or batch_n
            if method == "tailscope":
                r, err = ours(sel, n, proj, f"k{k}-{proj}")
                if r is not None:
                    batch_n = r["batch"]
                    batch_file = (full or {}).get("batch") or batch_n
            elif not batch_file:
                print(f"  {method:10s} {proj:9s}: skipped (no tailscope run of the {n} samples gave their batch; set OURS_PROJ)", flush=True)
                continue
            else:
                r, err = peer(sel, method, proj, batch_file, f"k{k}-{proj}")
            row = {"selection": sel, "method": method, "projection": proj, "samples": n, "k": k}
            if r is None:
                row["error"] = err
                print(f"  {method:10s} {proj:9s}: FAILED ({err.strip().splitlines()[-1] if err.strip() else err})", flush=True)
            else:
                row.update(seconds=r["seconds"], samples_per_s=n / r["seconds"], rss_gb=r["rss_kib"] * 1024 / 1e9,
                           kernel_error=error_of(r["K"], batch_file),
                           error_on=n if full is not None else subset)
                print(f"  {method:10s} {proj:9s} K={k}: {row['samples_per_s']:.2f} samples/s ({r['seconds']:.1f} s), "
                      f"peak RSS {r['rss_kib'] / 1048576:.2f} GiB, kernel error {row['kernel_error']:.3f}", flush=True)
            results.append(row)
        # 4. ratios: tailscope's best projection against the fastest peer at comparable error
        timed = [r for r in results if r["selection"] == sel and r.get("k") and "samples_per_s" in r]
        mine = [r for r in timed if r["method"] == "tailscope"]
        theirs = [r for r in timed if r["method"] != "tailscope"]
        if mine and theirs:
            print(f"  ratios (tailscope / peer; speed >1 is faster, memory <1 is lighter):")
            for m in mine:
                for p in theirs:
                    print(f"    tailscope {m['projection']:9s} (err {m['kernel_error']:.3f}) vs {p['method']:10s} {p['projection']:9s} (err {p['kernel_error']:.3f}): "
                          f"speed {m['samples_per_s'] / p['samples_per_s']:.2f}x, peak memory {m['rss_gb'] / p['rss_gb']:.2f}x")
    # the same rows as a Markdown table (what the README quotes)
    lines = ["| selection | method | projection | samples | samples/s | peak RSS (GB) | kernel error | agreement |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        fmt = lambda key, f: (f % r[key]) if r.get(key) is not None else ""
        lines.append("| %s | %s | %s | %d | %s | %s | %s | %s |" % (
            r["selection"], r["method"], r["projection"], r["samples"], fmt("samples_per_s", "%.2f"), fmt("rss_gb", "%.2f"),
            fmt("kernel_error", "%.3f"), fmt("agreement_rel_max", "%.1e") or ("failed" if r.get("error") else "")))
    tmp = os.path.join(work, "results.md.tmp")
    open(tmp, "w").write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(work, "results.md"))
    tmp = os.path.join(work, "results.json.tmp")
    json.dump(results, open(tmp, "w"), indent=1)
    os.replace(tmp, os.path.join(work, "results.json"))
    print(f"\nwrote {os.path.join(work, 'results.json')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        method, sel, proj, k, batch_file, model_dir, out, batch, group = sys.argv[2:11]
        run_peer(method, sel, proj, int(k), batch_file, model_dir, out, int(batch), int(group))
    else:
        driver()
