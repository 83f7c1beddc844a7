"""The paper's analyses as tools: effective receptive field, resolution scaling, robustness to
corruptions and ablations. Each works on any model timm can build (CycleMLP is registered on
import) and writes a table (CSV and JSON) and a PNG figure."""
