"""Expert-parallel inference: a checkpoint served by groups of Ray actors, each holding
the dense part and 1/N of every MoE layer's experts."""
