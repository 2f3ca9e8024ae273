"""Per-image token (patch) pruning for timm ViT/DeiT with hooks only (paper section 4.5).

NeuroChains on a vision transformer freezes every weight and learns one score per *(image, block,
token)*: "the patch scores are not shared among training samples, i.e., each input sample has its
own patch scores" (section 4.5). The objective is Eq. 8 with the L1 term on token scores::

    mean_n KL(softmax(F(x_n)) || softmax(F(x_n; tokens scored by s_n)))  +  lam * mean_n ||s_n||_1

What a score means here (the decisions, and why):

* **Where.** ``s[n, i, t]`` scores token ``t`` *as an input of block i* (the sequence block ``i``
  processes, i.e. the one leaving block ``i-1``, or the embedding for ``i = 0``). Read as "the
  sequence leaving block i", the last block's tokens would be free to drop under class-token pooling;
  the paper's Fig. 7 shows patches retained *in* the last block. Labels follow the adapters' token
  sites: token ``t`` of block ``i`` is ``B{i+1}_T{t}``.
* **Cumulative.** A token's presence in block ``i`` is ``m[n, i, t] = min_{j <= i} s[n, j, t]``; it is
  kept when ``m >= tau``. So a token pruned in block ``i`` stays pruned in every later block, and the
  binary mask is exactly the product of the per-block masks ``[s >= tau]``. Class/register (prefix)
  tokens always have presence 1: they are never pruned (the class token is what the head reads).
* **Exact exclusion.** A forward pre-hook on every block passes an additive ``attn_mask`` of shape
  ``(n, 1, 1, T)``: ``-inf`` for every pruned key. A pruned token is thus neither a key nor a value
  of any later block; attention, LayerNorm and MLP act per token otherwise, and the head reads only
  the class token, so it influences nothing downstream. timm's fused (SDPA) and manual attention
  paths both accept this mask and agree.
* **Soft form.** A kept token's presence enters as the additive bias ``log m``: it multiplies that
  key's unnormalised attention weight ``exp(q.k)`` in every query's softmax. ``m = 1`` is the
  original network, ``m -> 0`` removes the key continuously, and the limit is the exact mask above.
  (Scaling the token's value instead would leave it absorbing attention mass at ``m = 0``.)

Maskings (:data:`hookchains.core.attach.MASKINGS`, called modes before 0.3), as for filters:

* ``soft`` -- bias ``log(m + 1e-6)`` for every token: the relaxed network of Eq. 8 (recipe ``paper``);
* ``hard`` -- kept tokens weighted by ``m`` (bias ``log m``), pruned ones ``-inf``: the thresholded
  network, like ``S * [S >= tau]`` for filters. :func:`fit_tokens` reports its fidelity and
  :func:`materialize_tokens` builds it by default;
* ``ste`` -- the ``hard`` forward with straight-through gradients (recipe ``ste``, default);
* ``mask`` -- kept tokens at weight 1: the binary sub-network;
* ``off`` -- the original model.

Why ``ste`` needs more than an ``attn_mask``: a key at ``-inf`` has probability 0, so its gradient is
0 and a pruned token could never come back. Measured on a small ViT trained on scikit-learn digits
(6 blocks, 17 tokens, 20 images): training ``hard`` collapsed (every score falls at the same rate
while the network still equals the teacher, the KL gradient being exactly 0 there; they all crossed
``tau`` in one step and none returned: KL 3.1, 11/20 agreement); training ``soft`` and thresholding
afterwards left a soft/hard gap (KL 0.005 soft, 0.46 hard). So masking ``ste`` runs timm's manual
attention path (``attn.fused_attn`` switched off while in ``ste``, restored after) and a forward hook
on ``attn.attn_drop`` -- whose input is the softmax -- reweights the probabilities to
``w_j p_ij / sum_k w_k p_ik``: the value of ``w`` is the hard weight (``m`` kept, 0 pruned), its
gradient the identity in ``m``. The forward is exactly the ``hard`` network; a pruned key gets the
gradient of re-admitting it. (The softmax runs with pruned keys at weight ``1e-4`` so the
renormalisation stays well conditioned; the hook replaces that weight with an exact 0.) Same data:
KL 0.006, 20/20 agreement, 50/102 slots kept, stopped after 85 steps (by the former token stop rule,
a stable kept *set*; the fit now runs the filter fit's loop and stop rule: ``benchmarks/token_stop.py``
measures both, e.g. task 3-8: 97 steps, 40.8 slots, KL 0.003 before; 48 steps, 46.1 slots, KL 0.010 now).

The path mirrors the filter path of :mod:`hookchains.core`: :mod:`.hooks` (``TokenChains``, the
twin of ``ScoreHooks``), :mod:`.fit` (``fit_tokens``, through the core's loop :func:`hookchains.core.fit.optimise`), :mod:`.result` (``TokenSubnetwork``),
:mod:`.materialize` (``materialize_tokens``) and :mod:`.attribution` (Eq. 10, Fig. 7). The same path
serves BERT-like text encoders wrapped in a text objective (per-sentence scores, padding never kept):
:mod:`.encoder` holds what differs for them.

Example (random weights, a tiny ViT, a few steps):

    >>> import timm, torch
    >>> from hookchains.tokens.fit import fit_tokens
    >>> from hookchains.tokens.materialize import materialize_tokens
    >>> model = timm.create_model("test_vit", img_size=32, num_classes=10).eval()
    >>> images = torch.randn(2, 3, 32, 32)
    >>> result = fit_tokens(model, images, steps=2, progress=False)
    >>> result.summary().startswith("keeps ")
    True
    >>> small = materialize_tokens(result, model, images)   # physically drops the pruned tokens, checked
"""
