"""Names in one place: special tokens, graph names, tensor names.

Torch-free. Everything that export, manifest and runtime must agree on by name lives here.
"""

# Special tokens (reference §2). Order matters: this is the order NExT-Chat adds them,
# so their ids are base_vocab + 0..4.
IM_PATCH = "<im_patch>"
IM_START = "<im_start>"
IM_END = "<im_end>"
AT = "<at>"          # trigger: its output hidden state is decoded into a box / mask
BOXES = "<boxes>"    # location slot: its input embedding is loc_encoder(box)
ADDED_TOKENS = (IM_PATCH, IM_START, IM_END, AT, BOXES)

# Base LLaMA specials.
UNK = "<unk>"
BOS = "<s>"
EOS = "</s>"

# Text placeholder expanded before tokenization (not a vocabulary token).
IMAGE_PLACEHOLDER = "<image>"

# Prompt template vicuna_v1.1 (reference §3.1).
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP = " "
SEP2 = EOS

# Graph names (DESIGN "the cut").
GRAPH_VISION = "vision"
GRAPH_LLM = "llm"
GRAPH_LOC_HEADS = "loc_heads"
GRAPH_SAM_ENCODER = "sam_encoder"
GRAPH_SAM_DECODER = "sam_decoder"
GRAPHS = (GRAPH_VISION, GRAPH_LLM, GRAPH_LOC_HEADS, GRAPH_SAM_ENCODER, GRAPH_SAM_DECODER)
# the retrieval family (nxc.model.retrieval): proposals + the object encoder's features once per image, object rows
GRAPH_PROPOSALS = "proposals"
GRAPH_OBJECT_FEATURES = "object_features"
RETRIEVAL_GRAPHS = (GRAPH_VISION, GRAPH_LLM, GRAPH_PROPOSALS, GRAPH_OBJECT_FEATURES)
ALL_GRAPHS = GRAPHS + (GRAPH_PROPOSALS, GRAPH_OBJECT_FEATURES)
# the generator (issue 28, nxc.model.generator): a latent diffusion decoder, in a build beside a family's graphs
GRAPH_DENOISER = "denoiser"               # UNet: sample, timestep, encoder_hidden_states -> noise (epsilon)
GRAPH_LATENT_DECODER = "latent_decoder"   # VAE decoder: raw latents -> pixels in [0, 1]
GRAPH_LATENT_ENCODER = "latent_encoder"   # VAE encoder (GLIGEN builds: editing): pixels -> latent mean, std
GENERATOR_GRAPHS = (GRAPH_DENOISER, GRAPH_LATENT_DECODER, GRAPH_LATENT_ENCODER)
GRAPH_TEXT_ENCODER = "text_encoder"       # the generator's CLIP text encoder: input_ids -> conditioning (optional)
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")   # its tokenizer (nxc.clip_tokenizer)
GENERATOR_SCHEDULERS = ("ddim", "euler", "lcm")   # the runtime's samplers, named as a manifest's default_scheduler
# NExT-GPT's output projector: the signal tokens' hiddens -> a generator's conditioning (nxc.model.nextgpt_projector)
GRAPH_PROJECTOR = "projector"
# the generation family (NExT-GPT, nxc.model.nextgpt): vision gives ONE pooled row per image; the signal tokens'
# hiddens -> projector -> the generator's graphs. Signal tokens: NExT-GPT's names, ordinary added tokens (one id each)
SIGNAL_TOKENS = ("[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]")
DRAWING_GRAPHS = (GRAPH_PROJECTOR, GRAPH_DENOISER, GRAPH_LATENT_DECODER)
GENERATION_GRAPHS = (GRAPH_VISION, GRAPH_LLM) + DRAWING_GRAPHS
EXPORT_GRAPHS = ALL_GRAPHS + DRAWING_GRAPHS     # every graph nxc-export --graphs may name


def family_graphs(grounding: str) -> tuple[str, ...]:
    """The graphs a model of this grounding family exports (nxc.config.NextChatConfig.grounding)."""
    if grounding == "generation":
        return GENERATION_GRAPHS
    return RETRIEVAL_GRAPHS if grounding == "retrieval" else GRAPHS


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"

# VITRON's module calls (issue 29): the backends a manifest's `modules` table may name, and the graphs each needs
MODULE_BACKENDS = {"segment": (GRAPH_SAM_ENCODER, GRAPH_SAM_DECODER),
                   "track": (GRAPH_SAM_ENCODER, GRAPH_SAM_DECODER),
                   "generate": (GRAPH_TEXT_ENCODER, GRAPH_DENOISER, GRAPH_LATENT_DECODER),
                   "edit": (GRAPH_TEXT_ENCODER, GRAPH_DENOISER, GRAPH_LATENT_DECODER, GRAPH_LATENT_ENCODER)}
MODULE_GRAMMARS = ("vitron",)                # <module>X</module><instruction>task: text</instruction><region>..
REGION_FRAMES = ("pixels", "norm")           # a <region>'s numbers: pixel xyxy on the image, or xyxy in [0, 1]
