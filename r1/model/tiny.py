"""Build `r1-tiny`, the embedded default model: a ~3M-parameter Qwen2 with a DeepSeek-R1 tokenizer.

What it is for: r1-cluster ships it inside the package so that every command, test and CI run
works offline with a real model through the same code path as DeepSeek-R1-Distill-Qwen (Qwen2
architecture, R1 special tokens and chat template, `<think>` reasoning). Later stages train it on
`r1.tasks.arithmetic` (SFT, then GRPO) so that rewards and evaluations have something to measure.

What it is not: a useful general model. Its tokenizer is trained on a few kilobytes of text and its
weights start random; it writes gibberish until trained, and even then only does small arithmetic.

The tokenizer is byte-level BPE (any text, Chinese included, encodes without unknown tokens) with
the Qwen2 normalizer (NFC) and pre-tokenizer, which splits digits one per token so that arithmetic
is learnable. Decoding gives back the NFC form of the input, i.e. the exact text for ordinary
English, Chinese and code. `<think>` and `</think>` are added tokens that are not special, as in
DeepSeek's tokenizer, so they survive `decode(..., skip_special_tokens=True)`. Encoding adds no
BOS; the chat template writes it.

`build_tiny` is deterministic: building twice gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_DIR = Path(__file__).parent.parent / "assets" / "r1-tiny"

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, PAD_TOKEN)
THINK_TOKENS = ("<think>", "</think>")

# The Qwen2 pre-tokenizer regex. `\p{N}` alone isolates every digit, so numbers are split one digit
# per token (what `pre_tokenizers.Digits(individual_digits=True)` would do). transformers 5 rebuilds
# every tokenizer of a qwen2 model with exactly this NFC + regex + ByteLevel pipeline when loading
# it with AutoTokenizer, whatever tokenizer.json says, so r1-tiny is trained with the same pipeline:
# the tokenizer that is built, saved and loaded is one and the same.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

VOCAB_SIZE = 2048  # including special and added tokens
MAX_POSITION_EMBEDDINGS = 1024
NUM_ARITHMETIC_PROBLEMS_PER_LEVEL = 300
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")

# DeepSeek-R1's template without tool calls: BOS, the (last) system prompt, then the turns. Past
# assistant turns keep only their answer: the reasoning up to `</think>` and the whitespace after it
# are dropped, matching r1.reasoning. The generation prompt pre-fills the reasoning opener. So to
# train on reasoning, render the prompt with add_generation_prompt=True and append the completion
# (e.g. `Problem.completion`) and EOS, rather than rendering the assistant message through the template.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_prompt='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system_prompt = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system_prompt -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] or '' -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1].lstrip() -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- elif message['role'] != 'system' -%}"
    "{{- raise_exception('r1-tiny chat template: role must be system, user or assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)

_ENGLISH = """\
Reasoning models think before they answer. A model like DeepSeek-R1 writes its chain of thought \
between think tags, checks each step, and only then gives a short final answer. Reinforcement \
learning with simple rule rewards, such as a correct final answer and a well-formed output, is \
enough to make this behaviour grow during training.
When you solve a problem step by step, write down what you know, what you want to find, and the \
operation that connects them. Check the result: does it make sense? If not, go back and try again.
Good code is easy to read. Small functions with clear names, one concept per file, and tests that \
describe the expected behaviour make a project easier to change. Errors should tell the user what \
to do next, for example which setting to change and to what value.
Thank you for contacting customer service. I am sorry to hear that you cannot log in to your \
account. Please click "Forgot password" on the sign-in page and follow the link in the email we \
send you. If the email does not arrive within ten minutes, check your spam folder or reply to this \
message and we will help you reset it. Your order was shipped yesterday and should arrive on Monday.
A cluster runs many processes on many machines. Requests arrive over HTTP, a scheduler batches \
them, and replicas of the model generate tokens in parallel. When the load grows, the autoscaler \
adds replicas; when it falls, it removes them. Every request gets a trace so that slow steps can be \
found later. Sessions keep the recent turns of a dialog so that the assistant remembers context.
The weather today is sunny with a light wind. Many people walk in the park, read books, or drink \
coffee with friends. Children play with a ball near the river while their parents talk.
Question: what is seven plus five? First, count on from seven: eight, nine, ten, eleven, twelve. \
So the sum is twelve. To subtract, take away; to multiply, add the same number several times; to \
divide, share equally into groups. Always compare your final answer with a quick estimate.
Safety matters. The assistant must refuse harmful requests, protect private information such as \
phone numbers, addresses and credit card details, and explain politely why it cannot help. A filter \
screens both the question and the answer before anything is shown, stored or logged.
Before running untrusted code, place it in a sandbox with strict limits on time, memory and files. \
Report whether it passed, failed, crashed or timed out, together with its standard output and errors.
Training a language model means showing it many examples and nudging its weights so that the next \
token becomes more likely. Supervised fine-tuning copies good answers; policy optimisation samples \
several answers per question, scores them, and prefers the better ones relative to the group.
History, science, music and sport: people learn about the world in many different ways. A library \
offers novels, dictionaries, maps and newspapers. Museums show paintings, ancient tools, fossils of \
dinosaurs and models of planets. Engineers design bridges, trains, phones and rockets.
"""

_CHINESE = """\
推理模型在回答之前会先思考。像DeepSeek-R1这样的模型会把思考过程写在思考标签之间，逐步检查每一步，然后给出简短的最终答案。\
通过强化学习和简单的规则奖励，例如答案正确和格式规范，模型就能逐渐学会这种行为。
您好，感谢您联系客服。忘记密码怎么办？请在登录页面点击“忘记密码”，然后按照邮件中的链接重新设置密码。\
如果十分钟内没有收到邮件，请检查垃圾邮件文件夹，或者直接回复本消息，我们会尽快为您处理。您的订单已经发货，预计周一送达。
写代码的时候，要让函数保持简短，名字清楚，并且为每个功能编写测试。出现错误时，错误信息应该告诉用户下一步该怎么做。
集群由许多机器组成。请求通过网络到达服务器，调度器把请求合并成批次，模型副本并行生成文本。负载增加时自动扩容，负载下降时自动缩容。
今天天气很好，阳光明媚。很多人在公园里散步、看书，或者和朋友一起喝咖啡。我们一起学习数学：二加三等于五，十减四等于六。
安全很重要。助手应该拒绝有害的请求，保护用户的隐私信息，例如电话号码、地址和银行卡号，并礼貌地说明原因。
训练语言模型就是给它看大量的例子，并调整参数，让正确的下一个词更有可能出现。监督微调模仿好的回答，强化学习则比较多个回答，奖励更好的那个。
"""

_PYTHON = """\
import os
import json
from pathlib import Path


def add(a: int, b: int) -> int:
    \"\"\"Return the sum of a and b.\"\"\"
    return a + b


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self, step: int = 1) -> int:
        self.value += step
        return self.value


def read_config(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


for index, item in enumerate(["a", "b", "c"]):
    print(f"{index}: {item}")

numbers = [x * x for x in range(10) if x % 2 == 0]
if not numbers:
    raise ValueError("numbers is empty; pass at least one value")
result = {"total": sum(numbers), "count": len(numbers)}
print(json.dumps(result, indent=2))


async def fetch(client, url: str, timeout_s: float = 5.0) -> str:
    response = await client.get(url, timeout=timeout_s)
    response.raise_for_status()
    return response.text


try:
    value = int(input("Enter a number: "))
except ValueError as error:
    print("not a number:", error)
else:
    while value > 0:
        value -= 1
    assert value == 0
"""


def training_corpus() -> list[str]:
    """The deterministic text the tokenizer is trained on (think tags left out: they are added tokens)."""
    from r1.tasks.arithmetic import LEVELS, generate_problems

    texts = [_ENGLISH, _CHINESE, _PYTHON]
    for level in LEVELS:
        for problem in generate_problems(NUM_ARITHMETIC_PROBLEMS_PER_LEVEL, level=level, seed=0):
            texts.append(f"{problem.question}\n{problem.think}\nThe answer is {problem.answer}.")
    return texts


def build_tokenizer():
    """Train the byte-level BPE tokenizer; returns a `transformers.PreTrainedTokenizerFast`."""
    # BPE training is reproducible with any number of rayon threads (ties between equally frequent
    # pairs are broken by token order, not by hash order), so parallelism is left as configured.
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(THINK_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, *, seed: int = 0):
    """A randomly initialised `Qwen2ForCausalLM` sized for CPU training, seeded for reproducibility."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=704,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # Seed a forked RNG so building does not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def build_tiny(out_dir: Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Build tokenizer and random-init model into `out_dir` (created if missing); returns `out_dir`.

    A directory that already holds a model is refused unless `overwrite`: the untrained weights
    would replace trained ones without a word."""
    from r1.model import create_output_dir, save_pretrained

    out_dir = Path(out_dir)
    held = [name for name in _MODEL_FILES if (out_dir / name).is_file()]
    if held and not overwrite:
        raise ValueError(f"output directory {out_dir} already holds a model ({held[0]}); give a new or empty "
                         "directory, or pass --overwrite to replace it with untrained weights")
    # Created first, so that a path that cannot be a directory fails before the build.
    create_output_dir(out_dir)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    tokenizer.save_pretrained(out_dir)
    save_pretrained(model, out_dir, safe_serialization=True)
    # The weights are written through a private temporary file (mode 0600); the model ships inside
    # the package, so every file must be readable by whoever runs it.
    for name in (*_TOKENIZER_FILES, *_MODEL_FILES):
        (out_dir / name).chmod(0o644)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """`python -m r1.model.tiny [OUT_DIR]`: rebuild r1-tiny (default: the shipped copy)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m r1.model.tiny", description=main.__doc__)
    parser.add_argument("out_dir", nargs="?", type=Path, default=TINY_MODEL_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
