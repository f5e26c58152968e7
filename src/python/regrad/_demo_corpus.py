"""The small text `regrad demo` trains on, shipped as a string so it needs no package-data lookup.

Written for regrad (Apache-2.0, like the package); plain ASCII so one byte is one token.
"""

TEXT = """\
A model reads a line of text one byte at a time and guesses the next byte. Each guess is a
probability, and the log of that probability is what the training service sends back. The
loss is the sum of the negative log probabilities of the bytes that really came next. When
the guesses get better, the loss goes down, and the model learns to spell the words it sees.

Some goals are not about the next byte alone. We may want the model to be less sure of
itself, so we add the entropy of its guesses. We may want its log probabilities to stay
small, so we add their absolute values. We may want it to stop repeating the same byte over
and over, so we count the places where it does and charge a price for each. Counting is not
something autograd can differentiate, so the gradient of that term is found by nudging each
log probability a little up and a little down and watching how the count moves.

Other goals live far away. A checker on another machine reads what the model wrote and says
whether it looks right. We ask it, we wait for the answer, and while we wait the other terms
keep working. When every answer is in, the terms are weighed and summed, and the gradient of
the whole sum with respect to every log probability goes back to the trainer in one piece.

The trainer does not care how each piece of the gradient was found. It multiplies the log
probabilities by the gradient, sums, and runs the backward pass through the model, which is
exactly the chain rule written out by hand. Then the optimizer takes a step, and the next
batch of text comes in, and the whole thing happens again, a few dozen times, until the
curves on the plot bend down and the table says that every term did what it was asked to do.
"""
