"""The training step written the way the official PyTorch code does it, as a reference.

It runs the generators again for the G step, back-propagates the D loss through the generators
(fakes not detached), calls every network once per input (no stacking) and runs in float32. The one
deliberate difference from PT: spectral norm's power iteration runs once per discriminator per step
(on its first call), as in the fast step, so the two are comparable number for number. The
benchmark times it against :meth:`ugatit.UGATIT.train_step`; the tests check they agree.
"""
from __future__ import annotations

import torch

import losses as L
from ugatit import UGATIT


def _critic(trainer: UGATIT, domain: str, image: torch.Tensor, first: bool) -> list:
    outs = []
    for scale in ('G', 'L'):
        net = trainer.D[domain][scale]
        net.train(first)
        outs.append(net(image))
    return outs


def reference_train_step(trainer: UGATIT, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """PT's iteration on the trainer's networks and optimizers; returns the loss totals."""
    weights = trainer.weights
    G, gan = trainer.G, trainer.gan_loss
    batch = trainer._prepare(batch)
    real_A, real_B = batch['A'], batch['B']
    trainer._set_lr(trainer.lr_at(step))
    G.train()
    trainer.D.requires_grad_(True)

    # D step: generator outputs with autograd, not detached (PT).
    trainer.D_optim.zero_grad()
    fake_A2B = G['A2B'](real_A).image
    fake_B2A = G['B2A'](real_B).image
    d_loss = 0.0
    for domain, real, fake, direction in (('A', real_A, fake_B2A, 'B2A'), ('B', real_B, fake_A2B, 'A2B')):
        real_out = _critic(trainer, domain, real, first=True)
        fake_out = _critic(trainer, domain, fake, first=False)
        d_loss = d_loss + trainer.adv_weight[direction] * (gan.d_real(real_out) + gan.d_fake(fake_out))
    d_loss.backward()
    trainer.D_optim.step()

    # G step: every generator output computed again.
    trainer.G_optim.zero_grad()
    fake_A2B, fake_B2A = G['A2B'](real_A), G['B2A'](real_B)
    rec_A, rec_B = G['B2A'](fake_A2B.image).image, G['A2B'](fake_B2A.image).image
    idt_A, idt_B = G['B2A'](real_A), G['A2B'](real_B)
    g_loss = 0.0
    for direction, fake, idt, rec, source, target in (('A2B', fake_A2B, idt_B, rec_A, real_A, real_B),
                                                       ('B2A', fake_B2A, idt_A, rec_B, real_B, real_A)):
        critic = _critic(trainer, direction[-1], fake.image, first=False)
        g_loss = g_loss + (trainer.adv_weight[direction] * gan.g(critic)
                           + weights.cycle_weight * L.l1(rec, source)
                           + weights.identity_weight * L.l1(idt.image, target)
                           + weights.cam_weight * L.generator_cam_loss(fake.cam_logit, idt.cam_logit))
    g_loss.backward()
    trainer.G_optim.step()
    trainer.after_step(step)
    return {'D/total': d_loss.detach(), 'G/total': g_loss.detach()}
