"""loraswap.registry"""
