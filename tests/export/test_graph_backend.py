"""engine.backends.graph.GraphBackend, the base of the onnxruntime and tensorrt backends, on runtimes that
are the declared networks' own PyTorch modules (what export traces): each network call runs the graph of
that name, the image VAE in chunks, copies where runtimes reuse their buffers, refusals naming the graph."""

import pytest
import torch

from engine.backends.eager import EagerBackend
from engine.backends.graph import GraphBackend
from engine.networks import networks_for


class ModuleBackend(GraphBackend):
    """Runs each declared network's module (``Network.module``); records the batch of every run; with
    ``reuse``, hands back one output buffer per network, overwritten by each run (as TensorRT's engines do)."""

    def __init__(self, model, text_encoder, names=None, reuse=False):
        super().__init__(model)
        self.outputs_reused = reuse
        self.text = text_encoder
        self.runs = []
        self.attach("modules", {n.name: n for n in networks_for(model.config, names=names)}, "graphs")

    def open(self, name):
        module = self.networks[name].module(self.model, self.text)
        buffers = {}

        def run(*tensors):
            self.runs.append((name, tensors[0].shape[0]))
            with torch.no_grad():
                out = module(*tensors)
            out = list(out) if isinstance(out, (tuple, list)) else [out]
            if not self.outputs_reused:
                return out
            for i, o in enumerate(out):
                buf = buffers.setdefault(i, torch.empty_like(o))
                if buf.shape != o.shape:
                    buf = buffers[i] = torch.empty_like(o)
                buf.copy_(o)
            return [buffers[i] for i in range(len(out))]

        return run


@pytest.mark.parametrize("reuse", [False, True])
def test_network_calls_run_the_graph_of_that_name(tiny_latent, reuse):
    model, text_encoder = tiny_latent
    graphs, eager = ModuleBackend(model, text_encoder, reuse=reuse), EagerBackend(model)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    content = torch.randn(2, 4, 16, 16, generator=gen)
    motion = torch.rand(2, *model.config.motion_shape(4), generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (2,), generator=gen)
    states, text = torch.randn(2, 8, 32, generator=gen), torch.randn(2, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(graphs.unet_step(content, t, states), eager.unet_step(content, t, states))
        torch.testing.assert_close(graphs.dit_step(motion, t, content, text), eager.dit_step(motion, t, content, text))
        video = graphs.decode(content, motion)
        other = graphs.decode(content.flip(0), motion.flip(0))  # a second run must not change the first
        torch.testing.assert_close(video, eager.decode(content, motion))
        torch.testing.assert_close(other, eager.decode(content.flip(0), motion.flip(0)))
        graphs.runs.clear()
        frames = graphs.decode_frames(video, chunk=3)  # 2 clips x 4 frames = 8 frames: 3 + 3 + 2
        assert graphs.runs == [("vae_decoder", 3), ("vae_decoder", 3), ("vae_decoder", 2)]
        torch.testing.assert_close(frames, eager.decode_frames(video, chunk=3))
        graphs.runs.clear()
        graphs.decode_frames(video)  # default: the graph's largest batch
        assert graphs.runs == [("vae_decoder", 8)]
    assert graphs.text_encoder() is None  # only a backend that says so runs the text encoder


def test_missing_graphs_are_named(tiny_latent):
    model, text_encoder = tiny_latent
    graphs = ModuleBackend(model, text_encoder, names=["content_unet", "motion_dit"])
    with pytest.raises(ValueError, match=r"^the graphs in 'modules' lack the ae_decoder graph\(s\); export it$"):
        graphs.check_required("export it")
    with pytest.raises(ValueError, match="^the graphs in 'modules' hold no vae_decoder graph$"):
        graphs.decode_frames(torch.zeros(1, 2, 4, 16, 16))
