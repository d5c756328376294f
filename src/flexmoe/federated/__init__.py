"""The Flower layer, and the only code that imports Flower: the ClientApp and ServerApp shells,
the message protocol, the server's rounds, strategies, simulation and local deployment."""
