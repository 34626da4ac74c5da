"""Healthy training programs (issue 13, part 4): the default ``Watch()`` should say nothing on them.

Each program is an ordinary training script of a well-known kind, written as its authors wrote it
(the pytorch/examples programs: ``mnist``, ``vae``, ``dcgan``, ``word_language_model``,
``reinforcement_learning/reinforce.py``, ``time_sequence_prediction``; Kipf & Welling's GCN), moved
into a ``LightningModule`` with as few changes as possible and shrunk to train in well under a minute
on one CPU thread, on synthetic data or scikit-learn's bundled ``load_digits`` (nothing downloaded).
Each states a metric and the level it must reach, so "healthy" is shown, not assumed.

Every program runs in a fresh (forked) process with ``Trainer(callbacks=[Watch()])`` and the Trainer's
defaults (``log_every_n_steps=50``); every alert is recorded. A warning or an error is a false alarm.

    PYTHONPATH=$PWD python benchmarks/diagnosis.py --healthy                 # all programs
    PYTHONPATH=$PWD python benchmarks/diagnosis.py --healthy --programs vae,gcn
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset


@dataclass
class Program:
    """One healthy program: what to fit, how, and how to tell that it trained."""

    module: pl.LightningModule
    train: Any  # a DataLoader
    metric: Callable[[pl.LightningModule], float]
    metric_name: str
    target: float  # the level ``metric`` must reach after fit
    higher_is_better: bool
    trainer: dict[str, Any] = field(default_factory=dict)  # Trainer arguments besides the defaults
    source: str = ""

    def reached(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.target if self.higher_is_better else value <= self.target


def _digits(seed: int):
    """scikit-learn's 8x8 digits (bundled, no download), split 80/20 by a seeded permutation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order], dtype=torch.float32) / 16.0  # pixel values 0..16 -> [0, 1]
    y = torch.tensor(y[order], dtype=torch.long)
    cut = int(0.8 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


# --------------------------------------------------------------------------- mnist (CNN, Adadelta, StepLR)
class MnistNet(nn.Module):
    """pytorch/examples ``mnist/main.py``'s ``Net``, unchanged."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


class Mnist(pl.LightningModule):
    def __init__(self, lr: float = 1.0, gamma: float = 0.7):
        super().__init__()
        self.net = MnistNet()
        self.lr, self.gamma = lr, gamma

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        data, target = batch
        output = self(data)
        loss = F.nll_loss(output, target)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adadelta(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.gamma)
        return [optimizer], [scheduler]


def _mnist_images(x: torch.Tensor) -> torch.Tensor:
    # digits are 8x8: upscaled to MNIST's 28x28 so the example's Net (fc1 of 9216 inputs) runs as written,
    # then normalized like the example's transforms.Normalize((0.1307,), (0.3081,)) with this data's statistics
    images = F.interpolate(x.view(-1, 1, 8, 8), size=(28, 28), mode="bilinear", align_corners=False)
    return (images - 0.30) / 0.40


def _accuracy(module, x, y) -> float:
    module.eval()
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


def mnist(seed: int) -> Program:
    (x, y), (xt, yt) = _digits(seed)
    x, xt = _mnist_images(x), _mnist_images(xt)
    return Program(
        module=Mnist(),
        train=DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True),
        metric=lambda m: _accuracy(m, xt, yt),
        metric_name="test accuracy",
        target=0.95,
        higher_is_better=True,
        trainer={"max_epochs": 6},
        source="pytorch/examples mnist/main.py (Net, Adadelta lr 1.0, StepLR gamma 0.7, batch 64)",
    )


# --------------------------------------------------------------------------- vae
class VAE(nn.Module):
    """pytorch/examples ``vae/main.py``'s ``VAE`` (784 -> 64 inputs); ``sample_in_eval`` as in the example."""

    def __init__(self, sample_in_eval: bool = True):
        super().__init__()
        self.sample_in_eval = sample_in_eval
        self.fc1 = nn.Linear(64, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 64)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        if not self.training and not self.sample_in_eval:
            return mu
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 64))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def vae_loss(recon_x, x, mu, logvar):
    # Reconstruction + KL divergence losses summed over all elements and batch (as in the example)
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


class VaeModule(pl.LightningModule):
    def __init__(self, sample_in_eval: bool):
        super().__init__()
        self.model = VAE(sample_in_eval)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        data, _ = batch
        recon_batch, mu, logvar = self(data)
        loss = vae_loss(recon_batch, data, mu, logvar)
        self.log("loss", loss / len(data))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _vae(seed: int, sample_in_eval: bool) -> Program:
    (x, y), (xt, _) = _digits(seed)

    def test_loss(m):
        m.eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            mu, logvar = m.model.encode(xt)
            z = mu + torch.randn(mu.shape, generator=g) * torch.exp(0.5 * logvar)
            return float(vae_loss(m.model.decode(z), xt, mu, logvar)) / len(xt)

    return Program(
        module=VaeModule(sample_in_eval),
        train=DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True),
        metric=test_loss,
        metric_name="test loss per image (nats)",
        target=30.0,
        higher_is_better=False,
        trainer={"max_epochs": 30},
        source="pytorch/examples vae/main.py (fc 400-20, BCE+KLD summed, Adam 1e-3, batch 128)",
    )


def vae(seed: int) -> Program:
    """As in the example: ``reparameterize`` samples noise in eval mode too."""
    return _vae(seed, sample_in_eval=True)


def vae_eval_mean(seed: int) -> Program:
    """The common variant: the mean in eval mode."""
    return _vae(seed, sample_in_eval=False)


# --------------------------------------------------------------------------- dcgan (manual optimization)
def weights_init(m):
    # custom weights initialization called on netG and netD (pytorch/examples dcgan/main.py)
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """DCGAN generator for 8x8 images: the example's layer pattern, two upsamplings instead of five."""

    def __init__(self, nz=16, ngf=32):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 2, 1, 0, bias=False),  # 2x2
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),  # 4x4
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, 1, 4, 2, 1, bias=False),  # 8x8
            nn.Tanh(),
        )

    def forward(self, input):
        return self.main(input)


class Discriminator(nn.Module):
    def __init__(self, ndf=32):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(1, ndf, 4, 2, 1, bias=False),  # 4x4
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),  # 2x2
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 2, 1, 0, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, input):
        return self.main(input).view(-1, 1).squeeze(1)


class DCGAN(pl.LightningModule):
    def __init__(self, nz=16):
        super().__init__()
        self.automatic_optimization = False
        self.nz = nz
        self.netG = Generator(nz)
        self.netG.apply(weights_init)
        self.netD = Discriminator()
        self.netD.apply(weights_init)
        self.criterion = nn.BCELoss()

    def forward(self, noise):
        return self.netG(noise)

    def training_step(self, batch, batch_idx):
        optimizerD, optimizerG = self.optimizers()
        real_cpu = batch[0]
        batch_size = real_cpu.size(0)
        real_label, fake_label = 1.0, 0.0
        ############################
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        ###########################
        optimizerD.zero_grad()
        label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype, device=self.device)
        output = self.netD(real_cpu)
        errD_real = self.criterion(output, label)
        self.manual_backward(errD_real)
        noise = torch.randn(batch_size, self.nz, 1, 1, device=self.device)
        fake = self.netG(noise)
        label.fill_(fake_label)
        output = self.netD(fake.detach())
        errD_fake = self.criterion(output, label)
        self.manual_backward(errD_fake)
        errD = errD_real + errD_fake
        optimizerD.step()
        ############################
        # (2) Update G network: maximize log(D(G(z)))
        ###########################
        optimizerG.zero_grad()
        label.fill_(real_label)  # fake labels are real for generator cost
        output = self.netD(fake)
        errG = self.criterion(output, label)
        self.manual_backward(errG)
        optimizerG.step()
        self.log_dict({"loss_D": errD, "loss_G": errG})

    def configure_optimizers(self):
        optimizerD = torch.optim.Adam(self.netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
        optimizerG = torch.optim.Adam(self.netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
        return optimizerD, optimizerG


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of vectors (FID's formula, on pixels)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def dcgan(seed: int) -> Program:
    (x, y), (xt, _) = _digits(seed)
    images = x.view(-1, 1, 8, 8) * 2 - 1  # the example's Normalize((0.5,), (0.5,)): [-1, 1] like Tanh
    real = (xt * 2 - 1).numpy()

    def fid(m):
        m.eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            fake = m.netG(torch.randn(1000, m.nz, 1, 1, generator=g)).view(1000, 64).numpy()
        return _frechet(fake.astype(np.float64), real.astype(np.float64))

    return Program(
        module=DCGAN(),
        train=DataLoader(TensorDataset(images, y), batch_size=64, shuffle=True, drop_last=True),
        metric=fid,
        metric_name="pixel-space Frechet distance to test digits",
        target=8.0,
        higher_is_better=False,
        trainer={"max_epochs": 25},
        source="pytorch/examples dcgan/main.py (weights_init, BCE, Adam 2e-4 betas (0.5, 0.999), D: two backwards)",
    )


# --------------------------------------------------------------------------- language models (time-major)
def _markov_corpus(seed: int, vocab: int = 64, length: int = 60000) -> torch.Tensor:
    """Text of a random sparse first-order Markov chain: each word has 3 likely successors.

    Its entropy bounds the attainable perplexity near 3, against ``vocab`` for a model that knows nothing.
    """
    rng = np.random.default_rng(seed)
    successors = np.stack([rng.choice(vocab, 3, replace=False) for _ in range(vocab)])
    probs = rng.dirichlet(np.ones(3) * 2, size=vocab)
    words = np.empty(length, dtype=np.int64)
    words[0] = 0
    choices = rng.random(length)
    for i in range(1, length):
        k = np.searchsorted(np.cumsum(probs[words[i - 1]]), choices[i])
        words[i] = successors[words[i - 1], min(k, 2)]
    return torch.from_numpy(words)


def batchify(data, bsz):
    # Work out how cleanly we can divide the dataset into bsz parts (word_language_model/main.py).
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    # Evenly divide the data across the bsz batches: (seq, batch), time-major.
    return data.view(bsz, -1).t().contiguous()


class BpttBatches(Dataset):
    """``get_batch(source, i)`` of the example as a data set: chunk ``i`` of ``bptt`` steps, read in order."""

    def __init__(self, source: torch.Tensor, bptt: int = 35):
        self.source, self.bptt = source, bptt

    def __len__(self):
        return (len(self.source) - 1) // self.bptt

    def __getitem__(self, index):
        i = index * self.bptt
        seq_len = min(self.bptt, len(self.source) - 1 - i)
        data = self.source[i : i + seq_len]
        target = self.source[i + 1 : i + 1 + seq_len].reshape(-1)
        return data, target


class RNNModel(nn.Module):
    """Container module with an encoder, a recurrent module, and a decoder (word_language_model/model.py)."""

    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=0.2):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def repackage_hidden(h):
    """Wraps hidden states in new Tensors, to detach them from their history."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


class LstmLM(pl.LightningModule):
    def __init__(self, ntokens, batch_size, lr=20.0):
        super().__init__()
        self.model = RNNModel(ntokens, 200, 200, 2, 0.2)
        self.batch_size, self.lr = batch_size, lr
        self.hidden = None

    def forward(self, data, hidden=None):
        if hidden is None:
            hidden = self.model.init_hidden(data.size(1))
        return self.model(data, hidden)

    def on_train_epoch_start(self):
        self.hidden = self.model.init_hidden(self.batch_size)

    def training_step(self, batch, batch_idx):
        data, targets = batch
        # Starting each batch, we detach the hidden state from how it was previously produced.
        # If we didn't, the model would try backpropagating all the way to start of the dataset.
        hidden = repackage_hidden(self.hidden)
        output, hidden = self.model(data, hidden)
        self.hidden = hidden
        loss = F.nll_loss(output, targets)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        # the example updates p.data.add_(p.grad, alpha=-lr) by hand: plain SGD
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _perplexity(m, source: torch.Tensor, recurrent: bool) -> float:
    m.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        hidden = m.model.init_hidden(source.size(1)) if recurrent else None
        batches = BpttBatches(source)
        for data, targets in (batches[i] for i in range(len(batches))):
            if recurrent:
                output, hidden = m.model(data, hidden)
            else:
                output = m(data)
            total += float(F.nll_loss(output, targets, reduction="sum"))
            count += len(targets)
    return math.exp(total / count)


def _lm_data(seed):
    corpus = _markov_corpus(seed)
    cut = int(0.9 * len(corpus))
    return batchify(corpus[:cut], 20), batchify(corpus[cut:], 10)


def _lm_program(seed: int, module: pl.LightningModule, recurrent: bool, source: str) -> Program:
    """word_language_model's recipe: time-major bptt chunks in order (``batch_size=None``), clip 0.25."""
    train, val = _lm_data(seed)
    return Program(
        module=module,
        train=DataLoader(BpttBatches(train), batch_size=None, shuffle=False),
        metric=lambda m: _perplexity(m, val, recurrent=recurrent),
        metric_name="validation perplexity",
        target=5.0,
        higher_is_better=False,
        trainer={"max_epochs": 3, "gradient_clip_val": 0.25},
        source=source,
    )


def lstm_lm(seed: int) -> Program:
    source = "pytorch/examples word_language_model (LSTM 2x200, bptt 35, batch 20, SGD lr 20, clip 0.25)"
    return _lm_program(seed, LstmLM(64, 20), recurrent=True, source=source)


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0).transpose(0, 1))

    def forward(self, x):
        x = x + self.pe[: x.size(0), :]
        return self.dropout(x)


class TransformerModel(nn.Module):
    """Container module with an encoder, a transformer module, and a decoder (model.py, encoder-only form).

    The example's current version subclasses ``nn.Transformer``, which also builds a six-layer decoder the
    forward never uses; this is its earlier ``nn.TransformerEncoder`` form, which trains the same.
    """

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5):
        super().__init__()
        self.model_type = "Transformer"
        self.src_mask = None
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout), nlayers)
        self.input_emb = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)
        initrange = 0.1
        nn.init.uniform_(self.input_emb.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def _generate_square_subsequent_mask(self, sz):
        return torch.log(torch.tril(torch.ones(sz, sz)))

    def forward(self, src, has_mask=True):
        if has_mask:
            if self.src_mask is None or self.src_mask.size(0) != len(src):
                self.src_mask = self._generate_square_subsequent_mask(len(src)).to(src.device)
        else:
            self.src_mask = None
        src = self.input_emb(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.encoder(src, mask=self.src_mask)
        output = self.decoder(output)
        return F.log_softmax(output, dim=-1)


class TransformerLM(pl.LightningModule):
    def __init__(self, ntokens, lr=5.0):
        super().__init__()
        self.model = TransformerModel(ntokens, 64, 2, 128, 2, 0.2)
        self.ntokens, self.lr = ntokens, lr

    def forward(self, data):
        return self.model(data).view(-1, self.ntokens)

    def training_step(self, batch, batch_idx):
        data, targets = batch
        output = self(data)
        loss = F.nll_loss(output, targets)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def transformer_lm(seed: int) -> Program:
    source = "pytorch/examples word_language_model --model Transformer --lr 5 (causal mask, clip 0.25; d 64)"
    return _lm_program(seed, TransformerLM(64), recurrent=False, source=source)


# --------------------------------------------------------------------------- graph network (GCN)
class GCNConv(nn.Module):
    """Kipf & Welling's graph convolution ``A_hat X W + b`` (A_hat: normalized adjacency with self-loops)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.xavier_uniform_(self.lin.weight)

    def forward(self, x, adj):
        return torch.sparse.mm(adj, self.lin(x)) + self.bias


class GCN(nn.Module):
    def __init__(self, in_channels, hidden_channels, out_channels):
        super().__init__()
        self.conv1 = GCNConv(in_channels, hidden_channels)
        self.conv2 = GCNConv(hidden_channels, out_channels)

    def forward(self, x, adj):
        x = F.dropout(x, p=0.5, training=self.training)
        x = self.conv1(x, adj).relu()
        x = F.dropout(x, p=0.5, training=self.training)
        x = self.conv2(x, adj)
        return x


class GcnModule(pl.LightningModule):
    def __init__(self, features, classes):
        super().__init__()
        self.model = GCN(features, 16, classes)

    def forward(self, x, adj):
        return self.model(x, adj)

    def training_step(self, data, batch_idx):
        out = self(data["x"], data["adj"])
        loss = F.cross_entropy(out[data["train_mask"]], data["y"][data["train_mask"]])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=5e-4)


def _graph(seed: int, nodes=600, classes=4, features=100):
    """A stochastic block model with bag-of-words-like features that hint at the class (Planetoid-like)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (nodes,), generator=g)
    same = y[:, None] == y[None, :]
    p = torch.where(same, torch.tensor(0.03), torch.tensor(0.002))
    a = torch.rand(nodes, nodes, generator=g) < p
    a = torch.triu(a, 1)
    a = (a | a.t()).float() + torch.eye(nodes)
    d = a.sum(1).rsqrt()
    adj = (d[:, None] * a * d[None, :]).to_sparse()
    topic = torch.rand(classes, features, generator=g) < 0.1  # each class's typical words
    words = torch.rand(nodes, features, generator=g) < 0.02 + 0.08 * topic[y].float()
    x = words.float()
    x = x / x.sum(1, keepdim=True).clamp_min(1)  # row-normalized features, as in Planetoid's preprocessing
    train_mask = torch.zeros(nodes, dtype=torch.bool)
    for c in range(classes):  # 20 labelled nodes per class
        train_mask[torch.nonzero(y == c)[:20, 0]] = True
    return {"x": x, "adj": adj, "y": y, "train_mask": train_mask, "test_mask": ~train_mask}


class _FullGraph(Dataset):
    def __init__(self, graph):
        self.graph = graph

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.graph


def gcn(seed: int) -> Program:
    graph = _graph(seed)

    def test_acc(m):
        m.eval()
        with torch.no_grad():
            pred = m(graph["x"], graph["adj"]).argmax(1)
        mask = graph["test_mask"]
        return float((pred[mask] == graph["y"][mask]).float().mean())

    return Program(
        module=GcnModule(graph["x"].shape[1], 4),
        train=DataLoader(_FullGraph(graph), batch_size=None),
        metric=test_acc,
        metric_name="test accuracy (unlabelled nodes)",
        target=0.75,
        higher_is_better=True,
        trainer={"max_epochs": 200},
        source="Kipf & Welling GCN as in pytorch_geometric examples/gcn.py (hidden 16, dropout 0.5, AdamW lr 0.01)",
    )


# --------------------------------------------------------------------------- policy gradient (REINFORCE)
class CartPole:
    """The classic cart-pole (Barto, Sutton & Anderson 1983), same constants as gym's CartPole-v1."""

    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    theta_threshold, x_threshold, max_steps = 12 * 2 * math.pi / 360, 2.4, 500

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def reset(self):
        self.state = self.rng.uniform(-0.05, 0.05, size=4)
        self.steps = 0
        return self.state.astype(np.float32)

    def step(self, action: int):
        x, x_dot, theta, theta_dot = self.state
        force = self.force_mag if action == 1 else -self.force_mag
        costheta, sintheta = math.cos(theta), math.sin(theta)
        total_mass = self.masspole + self.masscart
        polemass_length = self.masspole * self.length
        temp = (force + polemass_length * theta_dot**2 * sintheta) / total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * costheta**2 / total_mass)
        )
        xacc = temp - polemass_length * thetaacc * costheta / total_mass
        x, x_dot = x + self.tau * x_dot, x_dot + self.tau * xacc
        theta, theta_dot = theta + self.tau * theta_dot, theta_dot + self.tau * thetaacc
        self.state = np.array([x, x_dot, theta, theta_dot])
        self.steps += 1
        fell = abs(x) > self.x_threshold or abs(theta) > self.theta_threshold
        return self.state.astype(np.float32), 1.0, fell, self.steps >= self.max_steps


class Policy(nn.Module):
    """reinforcement_learning/reinforce.py's ``Policy``."""

    def __init__(self):
        super().__init__()
        self.affine1 = nn.Linear(4, 128)
        self.dropout = nn.Dropout(p=0.6)
        self.affine2 = nn.Linear(128, 2)

    def forward(self, x):
        x = self.affine1(x)
        x = self.dropout(x)
        x = F.relu(x)
        action_scores = self.affine2(x)
        return F.softmax(action_scores, dim=1)


class Episodes(IterableDataset):
    """One item per episode, forever (the example's ``for i_episode in count(1)``)."""

    def __iter__(self):
        return itertools.count(1)


class Reinforce(pl.LightningModule):
    def __init__(self, seed: int, gamma: float = 0.99):
        super().__init__()
        self.policy = Policy()
        self.env = CartPole(seed)
        self.gamma = gamma
        self.lengths: list[int] = []

    def forward(self, state):
        return self.policy(state)

    def select_action(self, state):
        probs = self(torch.from_numpy(state).float().unsqueeze(0))
        m = torch.distributions.Categorical(probs)
        action = m.sample()
        return action.item(), m.log_prob(action)

    def training_step(self, batch, batch_idx):
        state, log_probs, rewards = self.env.reset(), [], []
        for _ in range(1, 10000):  # Don't infinite loop while learning
            action, log_prob = self.select_action(state)
            state, reward, fell, truncated = self.env.step(action)
            log_probs.append(log_prob)
            rewards.append(reward)
            if fell or truncated:
                break
        self.lengths.append(len(rewards))
        R, returns = 0.0, []
        for r in rewards[::-1]:
            R = r + self.gamma * R
            returns.insert(0, R)
        returns = torch.tensor(returns)
        returns = (returns - returns.mean()) / (returns.std() + np.finfo(np.float32).eps.item())
        policy_loss = torch.cat([-lp * R for lp, R in zip(log_probs, returns)]).sum()
        self.log("episode_length", float(len(rewards)))
        return policy_loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _mean_episode(m, episodes=20) -> float:
    env = CartPole(12345)
    m.eval()
    lengths = []
    with torch.no_grad():
        torch.manual_seed(0)
        for _ in range(episodes):
            state, done, steps = env.reset(), False, 0
            while not done:
                action, _ = m.select_action(state)
                state, _, fell, truncated = env.step(action)
                steps += 1
                done = fell or truncated
            lengths.append(steps)
    return float(np.mean(lengths))


def reinforce(seed: int) -> Program:
    return Program(
        module=Reinforce(seed),
        train=DataLoader(Episodes(), batch_size=None),
        metric=_mean_episode,
        metric_name="mean episode length (20 episodes, max 500)",
        target=100.0,
        higher_is_better=True,
        trainer={"max_steps": 400},
        source="pytorch/examples reinforcement_learning/reinforce.py (Policy 128, dropout 0.6, Adam 1e-2, gamma .99)",
    )


# --------------------------------------------------------------------------- float64 LBFGS sequence model
class Sequence(nn.Module):
    """time_sequence_prediction/train.py's ``Sequence``."""

    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, 51)
        self.lstm2 = nn.LSTMCell(51, 51)
        self.linear = nn.Linear(51, 1)

    def forward(self, input, future=0):
        outputs = []
        h_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        h_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        for _ in range(future):  # if we should predict the future
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        return torch.cat(outputs, dim=1)


class SineLBFGS(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.seq = Sequence()
        self.seq.double()
        self.criterion = nn.MSELoss()

    def forward(self, input, future=0):
        return self.seq(input, future)

    def training_step(self, batch, batch_idx):
        input, target = batch
        out = self(input)
        loss = self.criterion(out, target)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        # use LBFGS as optimizer since we can load the whole data to train
        return torch.optim.LBFGS(self.parameters(), lr=0.8)


def _sine_data(seed: int, T=20, L=120, N=100):
    # generate.py of the example (L shortened from 1000 to 120, 6 periods, to keep a fit under a minute)
    rng = np.random.default_rng(seed)
    x = np.empty((N, L), np.int64)
    x[:] = np.array(range(L)) + rng.integers(-4 * T, 4 * T, N).reshape(N, 1)
    data = torch.from_numpy(np.sin(x / 1.0 / T).astype("float64"))
    return data


def lbfgs_sine(seed: int) -> Program:
    data = _sine_data(seed)
    input, target = data[3:, :-1], data[3:, 1:]
    test_input, test_target = data[:3, :-1], data[:3, 1:]
    future = 100

    def test_loss(m):
        m.eval()
        with torch.no_grad():
            # predict 100 steps past the end as the example does, scored on the known part
            pred = m(test_input, future=future)
            return float(F.mse_loss(pred[:, :-future], test_target))

    return Program(
        module=SineLBFGS(),
        train=DataLoader(TensorDataset(input, target), batch_size=len(input)),
        metric=test_loss,
        metric_name="test MSE (next-value prediction)",
        target=1e-3,
        higher_is_better=False,
        trainer={"max_epochs": 6},
        source="pytorch/examples time_sequence_prediction (LSTMCell 51 x2, .double(), LBFGS lr 0.8, full batch)",
    )


#: every healthy program, by name
PROGRAMS: dict[str, Callable[[int], Program]] = {
    "mnist": mnist,
    "vae": vae,
    "vae_eval_mean": vae_eval_mean,
    "dcgan": dcgan,
    "lstm_lm": lstm_lm,
    "transformer_lm": transformer_lm,
    "gcn": gcn,
    "reinforce": reinforce,
    "lbfgs_sine": lbfgs_sine,
}


# --------------------------------------------------------------------------- running and reporting
def registry(real: bool | None = None) -> dict[str, Callable[[int], Program]]:
    """The healthy programs (``real=False``), the real models (``True``) or both (``None``)."""
    from .real_models import MODELS

    return {**(PROGRAMS if real is not True else {}), **(MODELS if real is not False else {})}


def run_program(name: str, seed: int, workdir: str, watched: bool = True) -> dict[str, Any]:
    """Fit program ``name`` once in this process with the default ``Watch()``; plain JSON-able results."""
    import logging
    import time

    from lightning.pytorch.loggers import TensorBoardLogger

    torch.set_num_threads(1)
    for logger in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    pl.seed_everything(seed, workers=True, verbose=False)
    program = registry()[name](seed)
    before = program.metric(program.module)
    program.module.train()
    callbacks = []
    watch = None
    if watched:
        from lightning_watch import Watch

        watch = Watch()
        callbacks.append(watch)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(workdir, name=name),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **program.trainer,
    )
    start = time.perf_counter()
    trainer.fit(program.module, program.train)
    seconds = time.perf_counter() - start
    after = program.metric(program.module)
    alerts = [] if watch is None else [
        {"code": a.code, "severity": a.severity, "step": a.step, "module": a.module, "message": a.message}
        for a in watch.alerts
    ]  # fmt: skip
    return {
        "program": name,
        "seed": seed,
        "source": program.source,
        "metric": program.metric_name,
        "target": program.target,
        "higher_is_better": program.higher_is_better,
        "before": before,
        "after": after,
        "trains": program.reached(after),
        "steps": int(trainer.global_step),
        "seconds": round(seconds, 2),
        "alerts": alerts,
        # the step of Watch's last statistics snapshot: proof that its rules had something to judge
        "last_snapshot_step": None if watch is None or watch.last_snapshot is None else watch.last_snapshot.step,
        "error": None,
    }


def _child(name: str, seed: int, conn) -> None:
    import os
    import sys
    import tempfile
    import traceback

    with tempfile.TemporaryDirectory(prefix="healthy_") as workdir, open(os.path.join(workdir, "log"), "w+") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            result = run_program(name, seed, workdir)
        except BaseException as exc:  # reported in the table, not raised
            log.flush()
            log.seek(0)
            result = {"program": name, "seed": seed, "error": f"{type(exc).__name__}: {exc}", "alerts": [],
                      "traceback": traceback.format_exc()[-3000:], "log_tail": log.read()[-2000:]}  # fmt: skip
        conn.send(result)
        conn.close()


def run_all(names: list[str], seed: int = 0, timeout: float = 300.0, progress: bool = True) -> list[dict[str, Any]]:
    """Each program in its own forked process (no hook, RNG or warning filter leaks into the next)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    rows = []
    for name in names:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(name, seed, child), daemon=True)
        proc.start()
        child.close()
        if parent.poll(timeout):
            try:
                row = parent.recv()
            except EOFError:
                row = {"program": name, "seed": seed, "error": "child exited without a result", "alerts": []}
        else:
            proc.kill()
            row = {"program": name, "seed": seed, "error": f"timeout after {timeout:.0f} s", "alerts": []}
        proc.join(5)
        rows.append(row)
        if progress:
            print(f"  {name}: {row.get('error') or _line(row)}", flush=True)
    return rows


def noisy(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The alerts of ``row`` that a healthy program must not get: warnings and errors."""
    return [a for a in row["alerts"] if a["severity"] in ("warning", "error")]


def _alerts_text(row: dict[str, Any]) -> str:
    if not row["alerts"]:
        return "none"
    counts: dict[tuple[str, str], int] = {}
    for a in row["alerts"]:
        counts[(a["code"], a["severity"])] = counts.get((a["code"], a["severity"]), 0) + 1
    return ", ".join(f"{code} ({sev}{f' x{n}' if n > 1 else ''})" for (code, sev), n in counts.items())


def _line(row: dict[str, Any]) -> str:
    trend = f"{row['before']:.4g} -> {row['after']:.4g}"
    verdict = "trains" if row["trains"] else "DOES NOT TRAIN"
    return f"{verdict} ({trend}), {row['seconds']:.0f} s, alerts: {_alerts_text(row)}"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if not r.get("error")]
    return {
        "programs": len(rows),
        "crashed": [r["program"] for r in rows if r.get("error")],
        "train": sum(r["trains"] for r in ok),
        "not_training": [r["program"] for r in ok if not r["trains"]],
        "with_false_alarm": [r["program"] for r in ok if noisy(r)],
        "false_alarms": sum(len(noisy(r)) for r in ok),
    }


def markdown(result: dict[str, Any], title: str = "Healthy programs") -> str:
    meta, summary = result["meta"], result["summary"]
    lines = [
        f"# {title}: alerts of the default `Watch()`",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, lightning {meta['lightning']}, "
        f"lightning_watch {meta['lightning_watch']}, seed {meta['seed']}, {meta['seconds']:.0f} s. "
        f"Command: `{meta['command']}`.",
        "",
        f"**{summary['train']}/{summary['programs']} train to their target; "
        f"{len(summary['with_false_alarm'])} with a warning or error ({summary['false_alarms']} alerts); "
        f"{len(summary['crashed'])} crashed.** Infos are listed but are not false alarms.",
        "",
        "| program | trains? | metric: before -> after (target) | steps | s | alerts (severity) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['program']} | crash | {r['error'][:80]} | | | |")
            continue
        cmp = ">=" if r["higher_is_better"] else "<="
        lines.append(
            f"| {r['program']} | {'yes' if r['trains'] else '**no**'} | {r['metric']}: {r['before']:.4g} -> "
            f"{r['after']:.4g} ({cmp} {r['target']:g}) | {r['steps']} | {r['seconds']:.0f} | {_alerts_text(r)} |"
        )
    lines += ["", "Sources:", ""] + [f"- `{r['program']}`: {r.get('source', '')}" for r in result["rows"]]
    details = [(r["program"], a) for r in result["rows"] for a in r["alerts"]]
    if details:
        lines += ["", "Alert messages:", ""]
        lines += [f"- `{p}` step {a['step']} {a['severity']} `{a['code']}` {a['module'] or ''}: {a['message']}"
                  for p, a in details]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(args: Any, argv: list[str] | None = None, real: bool = False) -> dict[str, Any]:
    """``diagnosis.py --healthy|--real [--programs a,b] [--out DIR]``: run, write healthy/real_models.{md,json}."""
    import datetime
    import json
    import os
    import platform
    import sys
    import time

    import lightning

    from .cli import _revision

    known = registry(real)
    names = args.programs.split(",") if args.programs else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"`--programs` must name programs of {sorted(known)}, got {unknown!r}.")
    seed = (args.watch_seeds or args.seeds)[0]
    start = time.perf_counter()
    import lightning_watch  # once, before the forks

    rows = run_all(names, seed=seed, timeout=args.timeout, progress=not args.quiet)
    result = {
        "rows": rows,
        "summary": summarize(rows),
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, torch threads 1",
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "lightning_watch": _revision(os.path.dirname(os.path.abspath(lightning_watch.__file__))),
            "seed": seed,
            "seconds": time.perf_counter() - start,
            "command": "python benchmarks/diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
    }
    os.makedirs(args.out, exist_ok=True)
    stem = ("real_models" if real else "healthy") + ("" if args.programs is None else "_subset")
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    text = markdown(result, "Healthy real models" if real else "Healthy programs")
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text)
    if not args.quiet:
        print(text)
    return result
