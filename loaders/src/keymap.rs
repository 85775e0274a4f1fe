//! FLUX's module names: BFL's (the internal naming) and how diffusers' names land on them.
//! One table serves both the checkpoint loader (`flux`) and the LoRA loader (`lora`), so a module
//! cannot map one way for weights and another way for adapters.

/// Prefixes that wrap the transformer's own names in files from other tools: ComfyUI's BFL
/// checkpoints, ComfyUI-saved LoRAs, diffusers pipelines, peft's `get_peft_model_state_dict`.
const PREFIXES: [&str; 4] = ["model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer."];

pub(crate) fn strip_prefix(key: &str) -> &str {
    PREFIXES.iter().find_map(|p| key.strip_prefix(p)).unwrap_or(key)
}

/// What a BFL module is: linears carry `weight` (+ `bias`), QK-RMSNorms a `scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Linear,
    Norm,
}

const TOP_LINEARS: [&str; 10] = [
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "vector_in.in_layer",
    "vector_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
];
const DOUBLE_LINEARS: [&str; 10] = [
    "img_mod.lin",
    "img_attn.qkv",
    "img_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_mod.lin",
    "txt_attn.qkv",
    "txt_attn.proj",
    "txt_mlp.0",
    "txt_mlp.2",
];
const DOUBLE_NORMS: [&str; 4] =
    ["img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm", "txt_attn.norm.key_norm"];
const SINGLE_LINEARS: [&str; 3] = ["linear1", "linear2", "modulation.lin"];
const SINGLE_NORMS: [&str; 2] = ["norm.query_norm", "norm.key_norm"];

const DOUBLE: &str = "double_blocks.";
const SINGLE: &str = "single_blocks.";

/// `"<prefix>N.rest"` -> `(N, rest)`, with N in canonical decimal (so `01` and `1` cannot name
/// the same block twice).
fn block<'a>(prefix: &str, module: &'a str) -> Option<(&'a str, &'a str)> {
    let (index, rest) = module.strip_prefix(prefix)?.split_once('.')?;
    let canonical = !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) && (index == "0" || !index.starts_with('0'));
    canonical.then_some((index, rest))
}

/// The kind of a BFL module path (`double_blocks.3.img_attn.qkv`), or `None` if FLUX has no such
/// module.
pub(crate) fn bfl_module(module: &str) -> Option<Kind> {
    let (linears, norms, rest): (&[&str], &[&str], &str) = if let Some((_, rest)) = block(DOUBLE, module) {
        (&DOUBLE_LINEARS, &DOUBLE_NORMS, rest)
    } else if let Some((_, rest)) = block(SINGLE, module) {
        (&SINGLE_LINEARS, &SINGLE_NORMS, rest)
    } else {
        (&TOP_LINEARS, &[], module)
    };
    if linears.contains(&rest) {
        Some(Kind::Linear)
    } else if norms.contains(&rest) {
        Some(Kind::Norm)
    } else {
        None
    }
}

/// Whether `key` names a parameter FLUX has in BFL's layout.
pub(crate) fn is_bfl_param(key: &str) -> bool {
    let Some((module, param)) = key.rsplit_once('.') else {
        return false;
    };
    match bfl_module(module) {
        Some(Kind::Linear) => param == "weight" || param == "bias",
        Some(Kind::Norm) => param == "scale",
        None => false,
    }
}

/// kohya's flattened names (`double_blocks_0_img_attn_qkv`, dots turned into underscores) back
/// to the BFL linear they adapt. Underscores inside BFL names make the flattening ambiguous in
/// general, so the name is matched against FLUX's own list rather than un-flattened.
pub(crate) fn bfl_linear_from_flat(flat: &str) -> Option<String> {
    fn find(names: &[&'static str], rest: &str) -> Option<&'static str> {
        names.iter().find(|n| n.replace('.', "_") == rest).copied()
    }
    for (prefix, names) in [(DOUBLE, &DOUBLE_LINEARS[..]), (SINGLE, &SINGLE_LINEARS[..])] {
        let flat_prefix = prefix.replace('.', "_");
        if let Some(rest) = flat.strip_prefix(&flat_prefix) {
            let (index, rest) = rest.split_once('_')?;
            let dotted = format!("{prefix}{index}.{}", find(names, rest)?);
            // Re-check through the dotted parser so the block index obeys the same rules.
            return (bfl_module(&dotted) == Some(Kind::Linear)).then_some(dotted);
        }
    }
    find(&TOP_LINEARS, flat).map(str::to_string)
}

/// How one diffusers module becomes (part of) a BFL module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// One to one.
    Whole,
    /// Rows `index` of the BFL module, which stacks the rows of `group` (diffusers module names
    /// relative to the block) in that order. Every member but a trailing `proj_mlp` has
    /// `hidden` rows, so member `index` starts at row `index * hidden`.
    Rows { index: usize, group: &'static [&'static str] },
    /// The same rows with their two halves exchanged: diffusers' final modulation is
    /// (scale, shift), BFL's (shift, scale).
    SwapHalves,
}

struct Rule {
    diffusers: &'static str,
    bfl: &'static str,
    place: Place,
}

const fn rule(diffusers: &'static str, bfl: &'static str) -> Rule {
    Rule { diffusers, bfl, place: Place::Whole }
}

/// Every member of a fused group maps to the same BFL module at its own row position.
const fn rows(group: &'static [&'static str], index: usize, bfl: &'static str) -> Rule {
    Rule { diffusers: group[index], bfl, place: Place::Rows { index, group } }
}

const QKV: &[&str] = &["attn.to_q", "attn.to_k", "attn.to_v"];
const ADDED_QKV: &[&str] = &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"];
const LINEAR1: &[&str] = &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"];

const TOP_RULES: &[Rule] = &[
    rule("x_embedder", "img_in"),
    rule("context_embedder", "txt_in"),
    rule("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    rule("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    rule("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    rule("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    rule("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    rule("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    Rule { diffusers: "norm_out.linear", bfl: "final_layer.adaLN_modulation.1", place: Place::SwapHalves },
    rule("proj_out", "final_layer.linear"),
];

const DOUBLE_RULES: &[Rule] = &[
    rule("norm1.linear", "img_mod.lin"),
    rule("norm1_context.linear", "txt_mod.lin"),
    rows(QKV, 0, "img_attn.qkv"),
    rows(QKV, 1, "img_attn.qkv"),
    rows(QKV, 2, "img_attn.qkv"),
    rows(ADDED_QKV, 0, "txt_attn.qkv"),
    rows(ADDED_QKV, 1, "txt_attn.qkv"),
    rows(ADDED_QKV, 2, "txt_attn.qkv"),
    rule("attn.norm_q", "img_attn.norm.query_norm"),
    rule("attn.norm_k", "img_attn.norm.key_norm"),
    rule("attn.norm_added_q", "txt_attn.norm.query_norm"),
    rule("attn.norm_added_k", "txt_attn.norm.key_norm"),
    rule("attn.to_out.0", "img_attn.proj"),
    rule("attn.to_add_out", "txt_attn.proj"),
    rule("ff.net.0.proj", "img_mlp.0"),
    rule("ff.net.2", "img_mlp.2"),
    rule("ff_context.net.0.proj", "txt_mlp.0"),
    rule("ff_context.net.2", "txt_mlp.2"),
];

const SINGLE_RULES: &[Rule] = &[
    rule("norm.linear", "modulation.lin"),
    rows(LINEAR1, 0, "linear1"),
    rows(LINEAR1, 1, "linear1"),
    rows(LINEAR1, 2, "linear1"),
    rows(LINEAR1, 3, "linear1"),
    rule("proj_out", "linear2"),
    rule("attn.norm_q", "norm.query_norm"),
    rule("attn.norm_k", "norm.key_norm"),
];

/// A diffusers module resolved to its BFL home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapped {
    /// Full BFL module path, e.g. `double_blocks.0.img_attn.qkv`.
    pub bfl: String,
    pub kind: Kind,
    pub place: Place,
    /// The diffusers name relative to its block (`attn.to_k`), to find its siblings by.
    pub member: &'static str,
}

/// Maps a diffusers `FluxTransformer2DModel` module path (no parameter suffix, no prefix).
pub(crate) fn diffusers_module(module: &str) -> Option<Mapped> {
    let (rules, bfl_block, rest) = if let Some((index, rest)) = block("transformer_blocks.", module) {
        (DOUBLE_RULES, format!("{DOUBLE}{index}."), rest)
    } else if let Some((index, rest)) = block("single_transformer_blocks.", module) {
        (SINGLE_RULES, format!("{SINGLE}{index}."), rest)
    } else {
        (TOP_RULES, String::new(), module)
    };
    let rule = rules.iter().find(|r| r.diffusers == rest)?;
    let bfl = format!("{bfl_block}{}", rule.bfl);
    let kind = bfl_module(&bfl).expect("every rule targets a module in the BFL tables");
    Some(Mapped { bfl, kind, place: rule.place, member: rule.diffusers })
}

/// The diffusers modules a BFL module is stored as, in row order, each with where its rows go:
/// the inverse of `diffusers_module`, for writing files diffusers reads.
pub(crate) fn diffusers_members(bfl: &str) -> Option<Vec<(String, Place)>> {
    let (rules, diffusers_block, rest) = if let Some((index, rest)) = block(DOUBLE, bfl) {
        (DOUBLE_RULES, format!("transformer_blocks.{index}."), rest)
    } else if let Some((index, rest)) = block(SINGLE, bfl) {
        (SINGLE_RULES, format!("single_transformer_blocks.{index}."), rest)
    } else {
        (TOP_RULES, String::new(), bfl)
    };
    bfl_module(bfl)?;
    let members: Vec<(String, Place)> =
        rules.iter().filter(|r| r.bfl == rest).map(|r| (format!("{diffusers_block}{}", r.diffusers), r.place)).collect();
    (!members.is_empty()).then_some(members)
}

/// Maps a diffusers parameter name to BFL's: norms call their weight `scale`.
pub(crate) fn bfl_param(kind: Kind, diffusers_param: &str) -> Option<&'static str> {
    match (kind, diffusers_param) {
        (Kind::Linear, "weight") => Some("weight"),
        (Kind::Linear, "bias") => Some("bias"),
        (Kind::Norm, "weight") => Some("scale"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_targets_a_bfl_module() {
        // diffusers_module panics on a rule whose target is missing from the BFL tables.
        for (prefix, rules) in [("", TOP_RULES), ("transformer_blocks.7.", DOUBLE_RULES), ("single_transformer_blocks.7.", SINGLE_RULES)] {
            for r in rules {
                assert!(diffusers_module(&format!("{prefix}{}", r.diffusers)).is_some(), "{}", r.diffusers);
            }
        }
    }

    #[test]
    fn members_invert_the_diffusers_mapping() {
        for bfl in [
            "img_in",
            "final_layer.adaLN_modulation.1",
            "double_blocks.3.txt_attn.qkv",
            "single_blocks.0.linear1",
            "single_blocks.2.norm.key_norm",
        ] {
            let members = diffusers_members(bfl).unwrap();
            for (i, (module, place)) in members.iter().enumerate() {
                let m = diffusers_module(module).unwrap();
                assert_eq!((m.bfl.as_str(), m.place), (bfl, *place), "{module}");
                if let Place::Rows { index, group } = place {
                    assert_eq!((*index, group.len()), (i, members.len()));
                }
            }
        }
        assert_eq!(diffusers_members("double_blocks.0.img_attn.qkv").unwrap().len(), 3);
        assert_eq!(diffusers_members("single_blocks.1.linear1").unwrap()[3].0, "single_transformer_blocks.1.proj_mlp");
        assert_eq!(diffusers_members("double_blocks.01.img_attn.qkv"), None);
        assert_eq!(diffusers_members("img_out"), None);
    }

    #[test]
    fn block_indices_must_be_canonical() {
        assert_eq!(bfl_module("double_blocks.10.img_attn.qkv"), Some(Kind::Linear));
        assert_eq!(bfl_module("double_blocks.0.img_attn.norm.key_norm"), Some(Kind::Norm));
        for bad in ["double_blocks.01.img_attn.qkv", "double_blocks.+1.img_attn.qkv", "double_blocks..img_attn.qkv", "single_blocks.1.qkv"]
        {
            assert_eq!(bfl_module(bad), None, "{bad}");
        }
    }

    #[test]
    fn flat_kohya_names_resolve() {
        assert_eq!(bfl_linear_from_flat("double_blocks_12_txt_mod_lin").as_deref(), Some("double_blocks.12.txt_mod.lin"));
        assert_eq!(bfl_linear_from_flat("single_blocks_3_modulation_lin").as_deref(), Some("single_blocks.3.modulation.lin"));
        assert_eq!(bfl_linear_from_flat("final_layer_adaLN_modulation_1").as_deref(), Some("final_layer.adaLN_modulation.1"));
        assert_eq!(bfl_linear_from_flat("time_in_out_layer").as_deref(), Some("time_in.out_layer"));
        assert_eq!(bfl_linear_from_flat("double_blocks_01_img_attn_qkv"), None);
        assert_eq!(bfl_linear_from_flat("single_blocks_3_norm_query_norm"), None);
    }
}
