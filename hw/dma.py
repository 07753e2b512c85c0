"""The DMA engine's client layouts (placeholder until the engine lands from its branch)."""
from amaranth.lib import data
DMA_READ = data.StructLayout({"addr": 64, "length": 16})
DMA_WRITE = data.StructLayout({"addr": 64, "length": 16})
def dma_read_data_layout(width):
    return data.StructLayout({"data": width, "keep": width // 8, "last": 1, "error": 1})
