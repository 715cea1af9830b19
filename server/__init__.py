"""loraswap.server"""
