//! The shapes of a diffusion pipeline, read from a diffusers folder's `config.json` files
//! (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`, `scheduler/`). Every size the engine
//! uses comes from here: channels, group-norm groups, heads, layers, time-embedding sizes, the
//! VAE's scaling factor. Missing keys take diffusers' defaults; values halo cannot run (another
//! block type, another activation) are errors naming the file and key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A number given once for all levels or once per level.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerLevel {
    One(u32),
    Each(Vec<u32>),
}

impl PerLevel {
    /// The value for each of `levels` levels.
    pub fn expand(&self, levels: usize) -> Option<Vec<u32>> {
        match self {
            PerLevel::One(v) => Some(vec![*v; levels]),
            PerLevel::Each(v) if v.len() == levels => Some(v.clone()),
            PerLevel::Each(_) => None,
        }
    }
}

fn one(v: u32) -> PerLevel {
    PerLevel::One(v)
}

/// `unet/config.json` (UNet2DConditionModel).
#[derive(Clone, Debug, Deserialize)]
pub struct UnetConfig {
    #[serde(default = "four")]
    pub in_channels: u32,
    #[serde(default = "four")]
    pub out_channels: u32,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f32,
    pub down_block_types: Vec<String>,
    #[serde(default = "mid_cross")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<u32>,
    #[serde(default = "two_per_level")]
    pub layers_per_block: PerLevel,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f32,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "groups")]
    pub norm_num_groups: u32,
    #[serde(default = "eps")]
    pub norm_eps: f32,
    pub cross_attention_dim: PerLevel,
    #[serde(default = "one_per_level")]
    pub transformer_layers_per_block: PerLevel,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default = "eight_per_level")]
    pub attention_head_dim: PerLevel,
    #[serde(default)]
    pub num_attention_heads: Option<PerLevel>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<u32>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<u32>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<u32>,
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub time_embedding_dim: Option<u32>,
    #[serde(default = "three")]
    pub conv_in_kernel: u32,
    #[serde(default = "three")]
    pub conv_out_kernel: u32,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub upcast_attention: bool,
}

/// `vae/config.json` (AutoencoderKL).
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: u32,
    #[serde(default = "three")]
    pub out_channels: u32,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<u32>,
    #[serde(default = "one_u")]
    pub layers_per_block: u32,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: u32,
    #[serde(default = "groups")]
    pub norm_num_groups: u32,
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f32,
    #[serde(default)]
    pub shift_factor: Option<f32>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

/// `text_encoder*/config.json` (CLIPTextModel / CLIPTextModelWithProjection).
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: u32,
    pub hidden_size: u32,
    pub intermediate_size: u32,
    pub num_hidden_layers: u32,
    pub num_attention_heads: u32,
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: u32,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f32,
    #[serde(default)]
    pub projection_dim: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

/// `transformer/config.json` of a Flux pipeline (diffusers' FluxTransformer2DModel).
#[derive(Clone, Debug, Deserialize)]
pub struct FluxConfig {
    #[serde(default = "one_u")]
    pub patch_size: u32,
    #[serde(default = "sixty_four")]
    pub in_channels: u32,
    #[serde(default)]
    pub out_channels: Option<u32>,
    pub num_layers: u32,
    pub num_single_layers: u32,
    pub attention_head_dim: u32,
    pub num_attention_heads: u32,
    pub joint_attention_dim: u32,
    pub pooled_projection_dim: u32,
    #[serde(default)]
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<u32>,
}

fn sixty_four() -> u32 {
    64
}

/// `text_encoder_2/config.json` of a Flux pipeline (transformers' T5EncoderModel).
#[derive(Clone, Debug, Deserialize)]
pub struct T5Config {
    pub vocab_size: u32,
    pub d_model: u32,
    pub d_kv: u32,
    pub d_ff: u32,
    pub num_layers: u32,
    pub num_heads: u32,
    #[serde(default = "thirty_two")]
    pub relative_attention_num_buckets: u32,
    #[serde(default = "one_twenty_eight")]
    pub relative_attention_max_distance: u32,
    #[serde(default = "t5_eps")]
    pub layer_norm_epsilon: f32,
    #[serde(default = "relu")]
    pub feed_forward_proj: String,
}

fn thirty_two() -> u32 {
    32
}
fn one_twenty_eight() -> u32 {
    128
}
fn t5_eps() -> f32 {
    1e-6
}
fn relu() -> String {
    "relu".into()
}

/// `scheduler/scheduler_config.json`: the noise schedule the samplers are built on.
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "thousand")]
    pub num_train_timesteps: u32,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub steps_offset: u32,
    #[serde(default = "linspace")]
    pub timestep_spacing: String,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
}

fn four() -> u32 {
    4
}
fn three() -> u32 {
    3
}
fn one_u() -> u32 {
    1
}
fn one_f() -> f32 {
    1.0
}
fn yes() -> bool {
    true
}
fn groups() -> u32 {
    32
}
fn eps() -> f32 {
    1e-5
}
fn silu() -> String {
    "silu".into()
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_str() -> String {
    "default".into()
}
fn mid_cross() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn two_per_level() -> PerLevel {
    one(2)
}
fn one_per_level() -> PerLevel {
    one(1)
}
fn eight_per_level() -> PerLevel {
    one(8)
}
fn sd_scaling() -> f32 {
    0.18215
}
fn seventy_seven() -> u32 {
    77
}
fn thousand() -> u32 {
    1000
}
fn beta_start() -> f64 {
    0.0001
}
fn beta_end() -> f64 {
    0.02
}
fn linear() -> String {
    "linear".into()
}
fn linspace() -> String {
    "linspace".into()
}
fn epsilon() -> String {
    "epsilon".into()
}

/// Reads and parses one JSON config file.
pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        message: format!("not a valid config: {e}"),
    })
}

/// One UNet level, resolved from the config's per-level lists.
#[derive(Clone, Debug, PartialEq)]
pub struct UnetLevel {
    pub channels: u32,
    pub resnets: u32,
    /// Transformer blocks in each of this level's spatial transformers; 0 for a level without
    /// attention (DownBlock2D / UpBlock2D).
    pub transformer_depth: u32,
    pub heads: u32,
    pub head_dim: u32,
}

/// The UNet's shape, checked: what the engine builds its graph from.
#[derive(Clone, Debug, PartialEq)]
pub struct UnetShape {
    pub in_channels: u32,
    pub out_channels: u32,
    pub levels: Vec<UnetLevel>,
    pub mid_transformer_depth: u32,
    pub groups: u32,
    pub norm_eps: f32,
    pub context_dim: u32,
    pub time_embed_dim: u32,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub linear_projection: bool,
    /// SDXL's added conditioning: (addition_time_embed_dim, projection input size).
    pub text_time: Option<(u32, u32)>,
}

impl UnetConfig {
    /// Checks the config is one halo can run and resolves the per-level values.
    pub fn shape(&self, path: &Path) -> Result<UnetShape, ConfigError> {
        let bad = |message: String| ConfigError {
            path: path.to_path_buf(),
            message,
        };
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(bad(format!(
                "block_out_channels, down_block_types and up_block_types must have one entry per \
                 level ({}, {} and {} given)",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self.act_fn != "silu" {
            return Err(bad(format!(
                "act_fn {:?} is not supported (only silu)",
                self.act_fn
            )));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(bad(format!(
                "resnet_time_scale_shift {:?} is not supported",
                self.resnet_time_scale_shift
            )));
        }
        for (key, set) in [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            (
                "only_cross_attention",
                self.only_cross_attention.as_bool() == Some(true),
            ),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
            ),
        ] {
            if set {
                return Err(bad(format!("{key} is not supported")));
            }
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            return Err(bad("conv_in_kernel and conv_out_kernel must be 3".into()));
        }
        let per = |key: &str, v: &PerLevel| {
            v.expand(n)
                .ok_or_else(|| bad(format!("{key} must have one entry per level ({n})")))
        };
        let resnets = per("layers_per_block", &self.layers_per_block)?;
        let depth = per(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
        )?;
        // diffusers' long-standing naming: without num_attention_heads, attention_head_dim is
        // the number of heads.
        let heads = per(
            "num_attention_heads",
            self.num_attention_heads
                .as_ref()
                .unwrap_or(&self.attention_head_dim),
        )?;
        let context_dim = match &self.cross_attention_dim {
            PerLevel::One(d) => *d,
            PerLevel::Each(v) if v.windows(2).all(|w| w[0] == w[1]) && !v.is_empty() => v[0],
            PerLevel::Each(_) => {
                return Err(bad(
                    "cross_attention_dim must be the same at every level".into()
                ))
            }
        };
        let groups = self.norm_num_groups;
        let mut levels = Vec::with_capacity(n);
        for i in 0..n {
            let channels = self.block_out_channels[i];
            let attn = match (
                self.down_block_types[i].as_str(),
                self.up_block_types[n - 1 - i].as_str(),
            ) {
                ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") => true,
                ("DownBlock2D", "UpBlock2D") => false,
                (d, u) => {
                    return Err(bad(format!(
                        "level {i}: the block pair {d:?} / {u:?} is not supported \
                         (CrossAttnDownBlock2D/CrossAttnUpBlock2D or DownBlock2D/UpBlock2D)"
                    )))
                }
            };
            if groups == 0 || !channels.is_multiple_of(groups) {
                return Err(bad(format!(
                    "block_out_channels[{i}] = {channels} is not a multiple of norm_num_groups = {groups}"
                )));
            }
            if attn && (heads[i] == 0 || !channels.is_multiple_of(heads[i])) {
                return Err(bad(format!(
                    "level {i}: {channels} channels do not split into {} heads",
                    heads[i]
                )));
            }
            levels.push(UnetLevel {
                channels,
                resnets: resnets[i],
                transformer_depth: if attn { depth[i] } else { 0 },
                heads: heads[i],
                head_dim: if attn { channels / heads[i] } else { 0 },
            });
        }
        let mid_transformer_depth = match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => depth[n - 1],
            other => return Err(bad(format!("mid_block_type {other:?} is not supported"))),
        };
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => Some((
                self.addition_time_embed_dim
                    .ok_or_else(|| bad("text_time needs addition_time_embed_dim".into()))?,
                self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    bad("text_time needs projection_class_embeddings_input_dim".into())
                })?,
            )),
            Some(other) => {
                return Err(bad(format!(
                    "addition_embed_type {other:?} is not supported"
                )))
            }
        };
        Ok(UnetShape {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            mid_transformer_depth,
            groups,
            norm_eps: self.norm_eps,
            context_dim,
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(self.block_out_channels[0] * 4),
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            linear_projection: self.use_linear_projection,
            text_time,
            levels,
        })
    }
}
