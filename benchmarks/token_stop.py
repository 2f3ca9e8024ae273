"""When does a token fit stop? A 6-block ViT (8 x 8 digits, 2 x 2 patches: 17 tokens) trained here on
scikit-learn digits, token scores fitted with the defaults on 20 held-out images per task.

Run: ``OMP_NUM_THREADS=1 python benchmarks/token_stop.py`` (about a minute on one core)."""
from __future__ import annotations

import timm
import torch
from sklearn.datasets import load_digits
from torch import nn

from hookchains.tokens.fit import fit_tokens


def digits_vit():
    data = load_digits()
    x = (torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64,
                                          depth=6, num_heads=4, mlp_ratio=2.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    for _ in range(15):
        for i in range(0, 1500, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[1500:]).argmax(-1) == y[1500:]).float().mean().item()
    return model, x, y, accuracy


def main() -> None:
    torch.set_num_threads(1)
    model, x, y, accuracy = digits_vit()
    print(f"digits ViT held-out accuracy {accuracy:.3f}")
    for pair in ((3, 8), (1, 7), (0, 6), (4, 9)):
        idx = torch.cat([torch.nonzero(y[1500:] == c).flatten()[:10] + 1500 for c in pair])
        for recipe in ("ste", "paper"):
            r = fit_tokens(model, x[idx], progress=False, recipe=recipe)
            c, f = r.counts(), r.fidelity
            print(f"task {pair} recipe {recipe}: steps {r.config['steps_run']}, ended {r.config.get('ended', '-')}, "
                  f"slots {c['slots_kept_mean']:.1f}/{c['slots_total']}, KL {f['kl']:.4f}, agree {f['agree']}/{f['images']}")


if __name__ == "__main__":
    main()
