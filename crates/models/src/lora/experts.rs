//! Adapters of a mixture's fused experts. transformers 5 stores a mixture's experts as two
//! parameters of one `experts` module, `gate_up_proj [experts, 2 * width, hidden]` (each
//! expert's gate rows, then its up rows) and `down_proj [experts, hidden, width]`, so PEFT
//! adapts them through `target_parameters` (its `lora.ParamWrapper`): one `lora_A
//! [experts * r, in]` and `lora_B [out, experts * r]` per parameter, expert `e`'s `A` being rows
//! `e*r .. (e+1)*r` and its `B` columns `e, e + experts, e + 2 * experts, ...` (PEFT's
//! `reshape(experts, r, in)` and `reshape(out, r, experts)`). A second parameter of the same
//! module is wrapped around the first, so its matrices sit under `experts.base_layer`.
//!
//! Our checkpoints keep each expert's layers apart (`mlp.experts.E.gate_proj` / `up_proj` /
//! `down_proj`, Mixtral's `block_sparse_moe.experts.E.w1` / `w3` / `w2`), so such an adapter is
//! installed as one ordinary pair of rank `r` per expert layer; which parameter a pair of
//! matrices adapts is told by its shape (`[2 * width, hidden]` or `[hidden, width]`, never
//! equal).

use std::collections::HashMap;
use std::sync::Arc;

use super::{LoraPair, LoraRegistry, LoraSlots, LoraWeights};
use crate::{Error, Result};

/// The `experts` module an adapter's module name adapts the parameters of (its `base_layer`
/// nesting removed), when it is one.
pub(super) fn owner(module: &str) -> Option<&str> {
    let mut m = module;
    while let Some(inner) = m.strip_suffix(".base_layer") {
        m = inner;
    }
    (m == "experts" || m.ends_with(".experts")).then_some(m)
}

/// Names of an expert's layers in the checkpoints we read: (gate, up, down).
const EXPERT_LAYERS: [(&str, &str, &str); 2] = [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")];

/// One expert's layers in the model: gate, up, down.
type ExpertSlots = [Arc<LoraSlots>; 3];

/// The model's experts under `owner` (`model.layers.0.mlp.experts`; Mixtral's checkpoint names
/// the module `block_sparse_moe`), each expert's gate, up and down layers, in order.
fn model_experts(layers: &HashMap<String, Arc<LoraSlots>>, owner: &str) -> Vec<ExpertSlots> {
    let mut prefixes = vec![owner.to_string()];
    if let Some(layer) = owner.strip_suffix("mlp.experts") {
        prefixes.push(format!("{layer}block_sparse_moe.experts"));
    }
    for prefix in &prefixes {
        for (gate, up, down) in EXPERT_LAYERS {
            let expert = |e: usize| -> Option<ExpertSlots> {
                let get = |n: &str| LoraRegistry::find(layers, &format!("{prefix}.{e}.{n}")).cloned();
                Some([get(gate)?, get(up)?, get(down)?])
            };
            let found: Vec<ExpertSlots> = (0..).map_while(expert).collect();
            if !found.is_empty() {
                return found;
            }
        }
    }
    Vec::new()
}

/// Each expert layer's pair for the fused adapter `w` of module `module` (`experts` experts of
/// rank `w.rank`): every expert's matrices checked against the model's layers first.
pub(super) fn plan(
    layers: &HashMap<String, Arc<LoraSlots>>,
    module: &str,
    w: &LoraWeights,
    experts: usize,
) -> Result<Vec<(Arc<LoraSlots>, LoraPair)>> {
    let owner = owner(module).unwrap_or(module);
    let found = model_experts(layers, owner);
    let Some([gate, up, down]) = found.first() else {
        return Err(Error::Config(format!(
            "the adapter targets the experts of {owner}, which this model does not have"
        )));
    };
    if found.len() != experts {
        return Err(Error::Config(format!(
            "the adapter's {module} holds {experts} experts, the model's {owner} has {}",
            found.len()
        )));
    }
    // The stacked parameter it adapts, by its shape: gate and up rows together, or down.
    let gate_up = (gate.out + up.out, gate.inp);
    let parts: Vec<(usize, std::ops::Range<usize>)> = if (w.out, w.inp) == gate_up && gate.inp == up.inp {
        vec![(0, 0..gate.out), (1, gate.out..gate.out + up.out)]
    } else if (w.out, w.inp) == (down.out, down.inp) {
        vec![(2, 0..down.out)]
    } else {
        return Err(Error::Config(format!(
            "the adapter's {module} is [{}, {}] per expert, neither the model's gate_up_proj [{}, {}] nor its \
             down_proj [{}, {}]",
            w.out, w.inp, gate_up.0, gate_up.1, down.out, down.inp
        )));
    };
    let (r, cols) = (w.rank, w.rank * experts);
    let mut plan = Vec::with_capacity(experts * parts.len());
    for (e, slots) in found.iter().enumerate() {
        let a = w.a[e * r * w.inp..(e + 1) * r * w.inp].to_vec();
        for (which, rows) in &parts {
            let layer = &slots[*which];
            // Expert e's B: row o, rank k at column k * experts + e; scaled.
            let b: Vec<f32> =
                rows.clone().flat_map(|o| (0..r).map(move |k| w.b[o * cols + k * experts + e] * w.scale)).collect();
            let pair = LoraPair { rank: r, inp: layer.inp, out: layer.out, a: a.clone(), b, replace: false };
            plan.push((layer.clone(), pair));
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_experts_modules_under_their_nesting() {
        assert_eq!(owner("model.layers.0.mlp.experts"), Some("model.layers.0.mlp.experts"));
        assert_eq!(owner("model.layers.0.mlp.experts.base_layer"), Some("model.layers.0.mlp.experts"));
        assert_eq!(owner("model.layers.0.mlp.experts.0.w1"), None);
        assert_eq!(owner("model.layers.0.mlp.shared_experts"), None);
    }
}
