"""Tools around a model: FLOP counting (:mod:`.flops`) and export (:mod:`.export`)."""
