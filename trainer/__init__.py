"""loraswap.trainer"""
