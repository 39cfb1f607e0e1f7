"""Few-shot training: group labels, group loss, selective backprop and ADA inside the trainer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_domain, tiny_flags, tiny_trainer, train_stream

import checkpoints
import main
from model import build_critic


@pytest.fixture
def grouped_dataset(tmp_path: Path) -> Path:
    root = tmp_path / 'grouped'
    for g, colour in enumerate([(200, 60, 60), (60, 200, 60)]):
        make_domain(root / 'trainA' / str(g), 3, 40, colour, g)
        make_domain(root / 'trainB' / str(g), 3, 40, colour[::-1], 10 + g)
        make_domain(root / 'testA' / str(g), 2, 40, colour, 20 + g)
        make_domain(root / 'testB' / str(g), 2, 40, colour[::-1], 30 + g)
    return root


_trainer = tiny_trainer


def _batch(group: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(group)
    batch = {k: torch.rand(3, 3, 32, 32, generator=g) * 2 - 1 for k in 'AB'}
    batch.update({'group_A': torch.full((3,), group), 'group_B': torch.full((3,), group)})
    return batch


def test_group_labels_come_from_folders(grouped_dataset, tmp_path):
    trainer = _trainer(grouped_dataset, tmp_path, '--group', '0,1', '--use_grouploss', 'True')
    stream = train_stream(trainer)
    groups = [int(next(stream)['group_A'][0]) for _ in range(4)]
    assert groups == [1, 0, 1, 0]           # round robin: step t uses groups[t % 2]
    assert trainer.D['B']['G'].group_fc is not None and not hasattr(trainer.D['A']['G'], 'group_fc')


def test_group_loss_matches_hand_computation(grouped_dataset, tmp_path):
    trainer = _trainer(grouped_dataset, tmp_path, '--group', '0,1', '--use_grouploss', 'True',
                       '--group_weight', '2', '--adv_weight', '1.5')
    batch = _batch(1)
    critics = build_critic(trainer.arch, 'B')  # SN weights are non-leaf tensors: copy via state dict
    critics.load_state_dict(trainer.D['B'].state_dict())
    expected_d = 0.0
    for scale in ('G', 'L'):
        critics[scale].train()
        logits = critics[scale](torch.cat([batch['B'], batch['B']]))  # same SN update as the stacked call
        expected_d += F.cross_entropy(logits.group_logit[:3], batch['group_B'])
    logs = trainer.train_step(batch, 1)
    torch.testing.assert_close(logs['D/group_B'], 1.5 * expected_d, rtol=1e-4, atol=1e-5)
    assert logs['G/group_A2B'] > 0 and 'G/group_B2A' not in logs   # F2W's group loss is A2B's alone


def test_group_classification_loss_is_cross_entropy_summed_over_scales():
    from losses import group_classification_loss
    from networks import DiscriminatorOutput
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    outs = [DiscriminatorOutput(None, None, None, logits), DiscriminatorOutput(None, None, None, 2 * logits)]
    labels = torch.tensor([0, 0])
    by_hand = sum(-torch.log_softmax(x, 1)[torch.arange(2), labels].mean() for x in (logits, 2 * logits))
    torch.testing.assert_close(group_classification_loss(outs, labels), by_hand)


def test_selective_backprop_freezes_bottleneck_on_other_groups(grouped_dataset, tmp_path):
    trainer = _trainer(grouped_dataset, tmp_path, '--group', '0,1', '--selective_backprop', 'True',
                       '--base_group', '0')
    frozen = trainer.frozen_on_other_groups
    assert frozen
    frozen_ids = {id(p) for p in frozen}
    before = [p.detach().clone() for p in frozen]
    others = [(p, p.detach().clone()) for p in trainer.G.parameters() if id(p) not in frozen_ids]
    for step in (1, 3):   # round-robin over groups [0, 1]: odd steps draw group 1
        trainer.train_step(_batch(1), step)
    for p, old in zip(frozen, before):
        assert torch.equal(p, old)                       # bit-identical: no Adam moment, no weight decay
        assert trainer.G_optim.state.get(p, {}) == {}
    assert any(not torch.equal(p, old) for p, old in others)
    trainer.train_step(_batch(0), 4)
    assert any(not torch.equal(p, old) for p, old in zip(frozen, before))


def test_ada_augments_d_inputs_adapts_p_and_survives_resume(grouped_dataset, tmp_path):
    flags = ('--group', '0,1', '--ada', 'True', '--ada_interval', '1', '--ada_kimg', '0.1', '--ada_p', '0.2')
    straight = tmp_path / 'straight'
    assert main.main(tiny_flags(grouped_dataset, straight, '--iteration', '4', '--save_freq', '2', *flags)) == 0
    broken = tmp_path / 'broken'
    assert main.main(tiny_flags(grouped_dataset, broken, '--iteration', '4', '--save_freq', '2', *flags)) == 0
    (broken / 'grouped' / 'model' / 'grouped_params_0000004.pt').unlink()
    assert main.main(tiny_flags(grouped_dataset, broken, '--iteration', '4', '--save_freq', '2', '--resume',
                                'True', *flags)) == 0
    a = checkpoints.load_checkpoint(straight / 'grouped' / 'model' / 'grouped_params_0000004.pt')
    b = checkpoints.load_checkpoint(broken / 'grouped' / 'model' / 'grouped_params_0000004.pt')
    step2 = checkpoints.load_checkpoint(straight / 'grouped' / 'model' / 'grouped_params_0000002.pt')
    for dom in 'AB':
        assert float(a['ada'][dom]['p']) == float(b['ada'][dom]['p'])
        assert float(a['ada'][dom]['p']) != 0.2             # adapted (step 0.01·... per D step)
        assert 0.0 <= float(a['ada'][dom]['p']) <= 1.0
    assert float(step2['ada']['A']['p']) != float(a['ada']['A']['p'])
    for name, value in a['disGB'].items():
        torch.testing.assert_close(value, b['disGB'][name], rtol=0, atol=0)


def test_ada_at_p_one_changes_what_d_sees(grouped_dataset, tmp_path):
    plain = _trainer(grouped_dataset, tmp_path, '--group', '0,1')
    ada = _trainer(grouped_dataset, tmp_path, '--group', '0,1', '--ada', 'True', '--ada_p', '1')
    ada.D.load_state_dict(plain.D.state_dict())
    images = [_batch(0)['B']]
    out_plain = plain.critic('B', images, update_sn=False, distributed=False)[0][0].logit
    out_ada = ada.critic('B', images, update_sn=False, distributed=False)[0][0].logit
    assert not torch.allclose(out_plain, out_ada)
    zero = _trainer(grouped_dataset, tmp_path, '--group', '0,1', '--ada', 'True', '--ada_p', '0')
    zero.D.load_state_dict(plain.D.state_dict())
    torch.testing.assert_close(zero.critic('B', images, distributed=False)[0][0].logit, out_plain)


def test_missing_selected_group_is_a_clear_error(grouped_dataset, tmp_path):
    with pytest.raises(Exception, match='group 2'):
        main.parse_args(tiny_flags(grouped_dataset, tmp_path, '--group', '0,2'))
