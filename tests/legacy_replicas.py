"""Small replicas of the published FedA2V generators (lucapalazzo/fedgfe, flcore/trainmodel/generators.py).

Written for the tests from the published classes' description: the same parameter names, shapes,
layer order and forward computation (reparametrisation noise drawn inside with ``randn_like``, as
published; a test seeds torch's global RNG to hand the project's models the same noise). Sizes
are arguments so tests stay small; features are ``[batch, sequence_length, dim]`` as published.
"""
from __future__ import annotations

import torch
from torch import nn


class VAEGenerator(nn.Module):
    def __init__(self, input_dim=6, hidden_dim=10, latent_dim=3, sequence_length=2):
        super().__init__()
        self.latent_dim, self.sequence_length, self.output_dim = latent_dim, sequence_length, input_dim
        total = sequence_length * input_dim
        self.encoder = nn.Sequential(nn.Linear(total, hidden_dim), nn.ReLU(), nn.Dropout(p=0.2),
                                     nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(p=0.2),
                                     nn.Linear(hidden_dim, latent_dim * 2))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Dropout(p=0.2),
                                     nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(p=0.2),
                                     nn.Linear(hidden_dim, total))

    def reparameterize(self, mu, logvar):
        logvar = torch.clamp(logvar, min=-5, max=2)
        mu = torch.clamp(mu, min=-5, max=5)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return torch.clamp(mu + eps * std, min=-5, max=5)

    def decode(self, z):
        return self.decoder(z).view(z.size(0), self.sequence_length, self.output_dim)

    def forward(self, x):
        q = self.encoder(x.view(x.size(0), -1))
        mu, logvar = q[:, :q.size(1) // 2], q[:, q.size(1) // 2:]
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


class ConditionedVAEGenerator(nn.Module):
    def __init__(self, input_dim=6, hidden_dim=10, latent_dim=3, visual_dim=4, sequence_length=2):
        super().__init__()
        self.input_dim, self.sequence_length = input_dim, sequence_length
        ti, tv = input_dim * sequence_length, visual_dim * sequence_length
        self.encoder = nn.Sequential(nn.Linear(ti + tv, hidden_dim), nn.LeakyReLU(0.2),
                                     nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2))
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim + tv, hidden_dim), nn.LeakyReLU(0.2),
                                     nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2),
                                     nn.Linear(hidden_dim, ti), nn.Tanh())

    def encode(self, x, visual_condition):
        b = x.size(0)
        h = self.encoder(torch.cat([x.view(b, -1), visual_condition.reshape(1, -1).repeat(b, 1)], dim=1))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z, visual_condition):
        b = z.size(0)
        out = self.decoder(torch.cat([z, visual_condition.view(1, -1).repeat(b, 1)], dim=1))
        return out.view(b, self.sequence_length, self.input_dim)

    def forward(self, x, visual_condition):
        mu, logvar = self.encode(x, visual_condition)
        z = mu + torch.randn_like(logvar) * torch.exp(0.5 * logvar)
        return self.decode(z, visual_condition), mu, logvar


class MultiModalVAEGenerator(nn.Module):
    def __init__(self, input_dim=6, hidden_dim=10, latent_dim=3, clip_dim=4, t5_dim=5, fusion_dim=7,
                 sequence_length=2):
        super().__init__()
        self.input_dim, self.sequence_length = input_dim, sequence_length
        ti = input_dim * sequence_length
        self.clip_projection = nn.Sequential(nn.Linear(clip_dim * sequence_length, fusion_dim), nn.LayerNorm(fusion_dim),
                                             nn.ReLU(), nn.Dropout(0.1))
        self.t5_projection = nn.Sequential(nn.Linear(t5_dim * sequence_length, fusion_dim), nn.LayerNorm(fusion_dim),
                                           nn.ReLU(), nn.Dropout(0.1))
        self.fusion = nn.Sequential(nn.Linear(fusion_dim * 2, fusion_dim), nn.LayerNorm(fusion_dim), nn.ReLU())
        self.single_fusion = nn.Sequential(nn.Linear(fusion_dim, fusion_dim), nn.LayerNorm(fusion_dim), nn.ReLU())
        self.encoder = nn.Sequential(nn.Linear(ti + fusion_dim, hidden_dim), nn.LeakyReLU(0.2), nn.Dropout(0.2),
                                     nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2), nn.Dropout(0.2))
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim + fusion_dim, hidden_dim), nn.LeakyReLU(0.2), nn.Dropout(0.2),
                                     nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2), nn.Dropout(0.2),
                                     nn.Linear(hidden_dim, ti), nn.Tanh())

    def fuse(self, clip_embedding):  # the CLIP-only branch of fuse_embeddings
        if clip_embedding.dim() == 2:
            clip_embedding = clip_embedding.unsqueeze(0)
        return self.single_fusion(self.clip_projection(clip_embedding.view(clip_embedding.size(0), -1)))

    def encode(self, x, clip_embedding):
        b = x.size(0)
        c = self.fuse(clip_embedding)
        if c.size(0) == 1:
            c = c.repeat(b, 1)
        h = self.encoder(torch.cat([x.view(b, -1), c], dim=1))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z, clip_embedding):
        b = z.size(0)
        c = self.fuse(clip_embedding)
        if c.size(0) == 1:
            c = c.repeat(b, 1)
        return self.decoder(torch.cat([z, c], dim=1)).view(b, self.sequence_length, self.input_dim)

    def forward(self, x, clip_embedding):
        mu, logvar = self.encode(x, clip_embedding)
        z = mu + torch.randn_like(logvar) * torch.exp(0.5 * logvar)
        return self.decode(z, clip_embedding), mu, logvar


class GANGenerator(nn.Module):
    def __init__(self, latent_dim=4, hidden_dim=10, output_dim=12):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(inplace=True),
                                   nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                   nn.Linear(hidden_dim, output_dim))

    def forward(self, z):
        return self.model(z)


class GANDiscriminator(nn.Module):
    def __init__(self, input_dim=12, hidden_dim=10):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(0.2),
                                   nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2, inplace=True), nn.Dropout(0.2),
                                   nn.Linear(hidden_dim, 1))

    def forward(self, x):
        return self.model(x)


def trained(module: nn.Module, steps: int = 2, seed: int = 0, lr: float = 2e-3, weight_decay: float = 0.05,
            amsgrad: bool = False, dtype: torch.dtype = torch.float32, used=lambda name: True):
    """The module with non-trivial weights and a real AdamW state after ``steps`` steps; parameters
    whose name ``used`` rejects get no gradient (so no optimizer state, like an unused branch)."""
    module = module.to(dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3)
    o = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.5, 0.99), amsgrad=amsgrad)
    for _ in range(steps):
        o.zero_grad()
        sum((p ** 2).sum() * (i + 1) for i, (n, p) in enumerate(module.named_parameters()) if used(n)).backward()
        o.step()
    return module, o
