"""Healthy real architectures (issue 13, part 3): Hugging Face models built from tiny configs.

Each is a published architecture as the ``transformers`` library implements it (BERT, DistilBERT,
GPT-2, Llama, T5, ViT, ResNet, MobileNetV2, EfficientNet, ConvNeXt, and LoRA adapters from ``peft``),
built from a small config (no weights downloaded), trained for 150 steps with AdamW on synthetic
data or scikit-learn's bundled digits, the way a Lightning user would wrap it: batches of keyword
tensors for text models (``self.model(**batch).loss``), ``(images, labels)`` for vision models.
Each states the level its metric must reach. Run with the default ``Watch()``, a warning or an error
is a false alarm.

    PYTHONPATH=$PWD python benchmarks/diagnosis.py --real
    PYTHONPATH=$PWD python benchmarks/diagnosis.py --real --programs gpt2,mobilenet_v2
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .healthy import Program, _digits, _markov_corpus

STEPS = 150
VOCAB = 100  # word ids 0..99; 100 is [PAD]/[CLS], 101 is [MASK]
PAD, MASK = 100, 101


class HFModule(pl.LightningModule):
    """A Hugging Face model in a LightningModule: text batches are dicts, image batches ``(x, y)``."""

    def __init__(self, model, lr: float = 1e-3, images: bool = False, weight_decay: float = 0.01):
        super().__init__()
        self.model = model
        self.lr, self.images, self.weight_decay = lr, images, weight_decay

    def forward(self, x):
        if self.images:
            return self.model(pixel_values=x).logits
        return self.model(input_ids=x).logits

    def training_step(self, batch, batch_idx):
        if self.images:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
        else:
            loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


# --------------------------------------------------------------------------- data
class _Windows(Dataset):
    """Random windows of ``length`` tokens of a synthetic Markov text (its perplexity floor is about 3)."""

    def __init__(self, corpus: torch.Tensor, length: int, mlm: bool = False, seq2seq: bool = False):
        self.corpus, self.length, self.mlm, self.seq2seq = corpus, length, mlm, seq2seq

    def __len__(self):
        return len(self.corpus) // self.length

    def __getitem__(self, i):
        ids = self.corpus[i * self.length : (i + 1) * self.length].clone()
        if self.seq2seq:  # continue the text: first half in, second half out
            half = self.length // 2
            return {"input_ids": ids[:half], "attention_mask": torch.ones(half, dtype=torch.long),
                    "labels": ids[half:]}  # fmt: skip
        if self.mlm:  # BERT's masking: 15 % of positions predicted, 80 % of those replaced by [MASK]
            labels = ids.clone()
            chosen = torch.rand(self.length) < 0.15
            labels[~chosen] = -100
            ids[chosen & (torch.rand(self.length) < 0.8)] = MASK
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _text(seed: int, length: int = 32, **kw):
    corpus = _markov_corpus(seed, vocab=VOCAB, length=80000)
    cut = int(0.9 * len(corpus))
    return _Windows(corpus[:cut], length, **kw), _Windows(corpus[cut:], length, **kw)


class _Topics(Dataset):
    """Two-class "topic" texts: class c is drawn from Markov chain c (different word statistics)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _topics(seed: int, n: int = 2000, length: int = 32, test: float = 0.2):
    """Train and test sets of ``n`` two-topic texts, shuffled once, split ``1 - test`` / ``test``."""
    chains = [_markov_corpus(seed * 2 + c, vocab=VOCAB, length=n * length // 2 + 1) for c in (0, 1)]
    items = []
    for c, chain in enumerate(chains):
        for i in range(n // 2):
            ids = torch.cat([torch.tensor([PAD]), chain[i * length : (i + 1) * length - 1]])  # [CLS] first
            items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(c)})
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))
    items = [items[i] for i in perm]
    cut = int((1 - test) * len(items))
    return _Topics(items[:cut]), _Topics(items[cut:])


def _held_out_loss(m, data, batches: int = 8) -> float:
    m.eval()
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=g)
    total = []
    with torch.no_grad():
        torch.manual_seed(0)  # the masking of an MLM batch is random
        for i, batch in enumerate(loader):
            if i == batches:
                break
            total.append(float(m.model(**batch).loss))
    return float(np.mean(total))


def _text_accuracy(m, data) -> float:
    m.eval()
    right = count = 0
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=64):
            pred = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
            right += int((pred == batch["labels"]).sum())
            count += len(pred)
    return right / count


def _lm(model, seed: int, target: float, source: str, lr: float = 1e-3, steps: int = STEPS, **kw) -> Program:
    train, test = _text(seed, **kw)
    return Program(
        module=HFModule(model, lr=lr),
        train=DataLoader(train, batch_size=32, shuffle=True),
        metric=lambda m: _held_out_loss(m, test),
        metric_name="held-out loss (nats/token)",
        target=target,
        higher_is_better=False,
        trainer={"max_steps": steps},
        source=source,
    )


def _classifier(model, seed: int, source: str) -> Program:
    train, test = _topics(seed)
    return Program(
        module=HFModule(model),
        train=DataLoader(train, batch_size=32, shuffle=True),
        metric=lambda m: _text_accuracy(m, test),
        metric_name="held-out accuracy",
        target=0.9,
        higher_is_better=True,
        trainer={"max_steps": STEPS},
        source=source,
    )


def _bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB + 2, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=64, pad_token_id=PAD, **kw)  # fmt: skip


# --------------------------------------------------------------------------- text models
def bert_mlm(seed: int) -> Program:
    from transformers import BertForMaskedLM

    source = "BertForMaskedLM, 2 layers x 64, 15 % masking, AdamW 2e-3, 300 steps"
    return _lm(BertForMaskedLM(_bert_config()), seed, 3.6, source, lr=2e-3, steps=300, mlm=True)


def bert_cls(seed: int) -> Program:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(_bert_config(num_labels=2))
    return _classifier(model, seed, "BertForSequenceClassification, 2 layers x 64, two-topic texts")


def distilbert_cls(seed: int) -> Program:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=VOCAB + 2, dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                              max_position_embeddings=64, pad_token_id=PAD, num_labels=2)  # fmt: skip
    return _classifier(DistilBertForSequenceClassification(config), seed, "DistilBertForSequenceClassification")


def gpt2(seed: int) -> Program:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB + 2, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    return _lm(GPT2LMHeadModel(config), seed, 1.6, "GPT2LMHeadModel (tied lm_head), 2 layers x 64")


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=PAD, bos_token_id=None, eos_token_id=None)  # fmt: skip


def llama(seed: int) -> Program:
    from transformers import LlamaForCausalLM

    return _lm(LlamaForCausalLM(_llama_config()), seed, 1.6, "LlamaForCausalLM (RMSNorm, SwiGLU, GQA), 2 x 64")


def t5(seed: int) -> Program:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=VOCAB + 2, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=None)  # fmt: skip
    return _lm(T5ForConditionalGeneration(config), seed, 2.5, "T5ForConditionalGeneration, continue a text",
               seq2seq=True)  # fmt: skip


def _pretrain(model, seed: int, steps: int = 150) -> None:
    """Plain-PyTorch causal-LM training of the base model on *another* synthetic text: the "pretrained"
    checkpoint that LoRA then adapts (no download; unwatched, before the watched fit)."""
    train, _ = _text(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break


def _lora(model, target_modules, seed, source) -> Program:
    from peft import LoraConfig, get_peft_model

    _pretrain(model, seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules, lora_dropout=0.05))
    # LoRA trains the adapters only: the usual higher learning rate of adapter fine-tuning
    return _lm(model, seed, 2.5, source, lr=3e-3)


def lora_llama(seed: int) -> Program:
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(_llama_config())
    source = "peft LoRA r 8 on a Llama pretrained on another text (base frozen)"
    return _lora(base, ["q_proj", "v_proj", "up_proj", "down_proj"], seed, source)


def lora_gpt2(seed: int) -> Program:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB + 2, n_positions=64, n_embd=64, n_layer=2, n_head=2))
    return _lora(base, ["c_attn", "c_fc"], seed, "peft LoRA r 8 on c_attn/c_fc of a GPT-2 pretrained on another text")


# --------------------------------------------------------------------------- vision models
def _images(seed: int, size: int):
    (x, y), (xt, yt) = _digits(seed)

    def prep(v):  # 8x8 digits upscaled, standardized (the model-zoo preprocessing: resize, normalize)
        return (F.interpolate(v.view(-1, 1, 8, 8), size=(size, size), mode="bilinear") - 0.3) / 0.4

    return (prep(x), y), (prep(xt), yt)


def _vision(model, seed: int, size: int, source: str, lr: float = 1e-3, steps: int = STEPS) -> Program:
    (x, y), (xt, yt) = _images(seed, size)

    def accuracy(m):
        m.eval()
        with torch.no_grad():
            return float((m(xt).argmax(1) == yt).float().mean())

    return Program(
        module=HFModule(model, lr=lr, images=True),
        train=DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
        metric=accuracy,
        metric_name="test accuracy",
        target=0.85,
        higher_is_better=True,
        trainer={"max_steps": steps},
        source=source,
    )


def vit(seed: int) -> Program:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=128, num_labels=10)  # fmt: skip
    return _vision(ViTForImageClassification(config), seed, 16, "ViTForImageClassification, 16x16, patch 4", steps=300)


def resnet(seed: int) -> Program:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                          layer_type="basic", num_labels=10)  # fmt: skip
    return _vision(ResNetForImageClassification(config), seed, 32, "ResNetForImageClassification (basic blocks, BN)")


def mobilenet_v2(seed: int) -> Program:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(num_channels=1, image_size=16, depth_multiplier=0.35, num_labels=10)
    source = "MobileNetV2ForImageClassification (ReLU6), 16x16, 300 steps"
    return _vision(MobileNetV2ForImageClassification(config), seed, 16, source, steps=300)


def efficientnet(seed: int) -> Program:
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    config = EfficientNetConfig(num_channels=1, image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                hidden_dim=320, num_labels=10)  # fmt: skip
    model = EfficientNetForImageClassification(config)
    # transformers 5.24 draws EfficientNet's BatchNorm weights from N(0, 0.02) instead of ones: the signal
    # shrinks ~1e5x per block, logits are ~1e-35 and it never trains (Watch says so: dead_units and
    # disconnected_parameters, a true alarm). Re-initialized as torchvision's EfficientNet is: weight 1, bias 0.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_parameters()
    source = "EfficientNetForImageClassification (SiLU, squeeze-excite; BatchNorm re-initialized to 1)"
    return _vision(model, seed, 32, source)


def convnext(seed: int) -> Program:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(num_channels=1, num_stages=3, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], patch_size=2,
                            num_labels=10)  # fmt: skip
    return _vision(ConvNextForImageClassification(config), seed, 32, "ConvNextForImageClassification (LayerNorm, GELU)")


#: every real model, by name
MODELS: dict[str, Callable[[int], Program]] = {
    "bert_mlm": bert_mlm,
    "bert_cls": bert_cls,
    "distilbert_cls": distilbert_cls,
    "gpt2": gpt2,
    "llama": llama,
    "t5": t5,
    "lora_llama": lora_llama,
    "lora_gpt2": lora_gpt2,
    "vit": vit,
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet": efficientnet,
    "convnext": convnext,
}
