"""What the tests of the blocks' compiled paths without gradients (recbole_ssm.ops.selective_mixer,
recbole_ssm.ops.ssd_mixer) share: the comparison with the ops one by one, and when the path is taken."""
import torch


def assert_matches_ops_one_by_one(block, u, lengths, tolerance):
    """``block`` (backend "auto") without gradients against itself with gradients (the ops one by one,
    compiled) and under the torch backend, on right-padded rows of ``lengths`` real items: at all real
    positions, and at each row's last real item."""
    mask = torch.arange(u.shape[1]) < lengths.unsqueeze(1)
    for positions in (None, lengths - 1):
        with torch.no_grad():
            fast = block(u, mask, positions=positions)
        one_by_one = block(u, mask, positions=positions).detach()      # gradients enabled: the ops path
        block.backend = "torch"
        with torch.no_grad():
            reference = block(u, mask, positions=positions)
        block.backend = "auto"
        real = mask if positions is None else torch.ones(len(lengths), dtype=torch.bool)
        torch.testing.assert_close(fast[real], one_by_one[real], rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(fast[real], reference[real], rtol=tolerance, atol=tolerance)


def assert_taken_only_without_gradients(block, u, calls, other_calls=()):
    """``calls`` (the path's calls, from the ``record_calls`` fixture) stay empty while the parameters
    or the input need gradients, during ``other_calls`` (each a function of no argument, run without
    gradients) and under the torch backend; then two calls without gradients take the path: under
    ``torch.no_grad``, and with frozen parameters and an input that needs none."""
    block(u).sum().backward()                          # parameters need gradients
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    block(u.requires_grad_()).sum().backward()         # the input needs them
    with torch.no_grad():
        for call in other_calls:
            call()
        block.backend = "torch"
        block(u)
    assert calls == []
    block.backend = "auto"
    with torch.no_grad():
        block(u)
    block(u.detach())                                  # frozen parameters, input without gradient
    assert len(calls) == 2
